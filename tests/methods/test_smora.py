"""SMoRA: top-k gating over rank-1 experts, the load-balancing bias rule, init == base, not mergeable."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.smora import SMoRA, SMoRALinear
from tests.helpers import logits, tiny


def _layer(r: int = 16, k: int = 8, alpha: float = 32.0, n: int = 12, m: int = 10) -> SMoRALinear:
    torch.manual_seed(0)
    layer = SMoRALinear(torch.nn.Linear(n, m), r, k, alpha, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.B.normal_()  # a non-zero update
    return layer


def test_exactly_k_gates_per_token_summing_to_k():
    layer = _layer()
    x = torch.randn(3, 5, 12)
    for beta in (torch.zeros(16), torch.randn(16) * 0.3):
        layer.beta.copy_(beta)
        gates, idx = layer.gates(x)  # (3, 5, 16), (3, 5, 8)
        assert ((gates != 0).sum(-1) == 8).all()
        torch.testing.assert_close(gates.sum(-1), torch.full((3, 5), 8.0))
        scores = torch.sigmoid(x @ layer.router.detach().mT) + beta  # g = σ(W_g x) + β
        assert torch.equal(idx.sort(-1).values, scores.topk(8, dim=-1).indices.sort(-1).values)
        kept = torch.gather(scores, -1, idx)
        torch.testing.assert_close(torch.gather(gates, -1, idx), 8 * kept / kept.sum(-1, keepdim=True))


def test_forward_is_the_gated_sum_of_rank_one_experts():
    layer = _layer()
    layer.eval()
    x = torch.randn(2, 4, 12)
    gates, idx = layer.gates(x)
    expected = layer.base(x)
    a, b = layer.A.detach(), layer.B.detach()
    for i in range(16):
        expected = expected + (32.0 / 8) * gates[..., i : i + 1] * (x @ a[i])[..., None] * b[:, i]  # (α/k)·ĝ_i·(a_iᵀx)·b_i
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_bias_moves_by_u_sign_of_mean_count_minus_count():
    layer = _layer(r=4, k=2)
    layer.train()
    x = torch.randn(3, 7, 12)
    layer(x)
    counts = layer.counts.clone()
    assert counts.sum() == 2 * 3 * 7  # k selections per token position
    manual = torch.bincount(layer.gates(x)[1].reshape(-1), minlength=4).float()
    assert torch.equal(counts, manual)
    layer.balance(1e-5)
    torch.testing.assert_close(layer.beta, 1e-5 * torch.sign(counts.mean() - counts))
    assert (layer.counts == 0).all()
    # an explicit case: over-used experts go down, under-used go up, average ones stay
    layer.beta.zero_()
    layer.counts.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    layer.balance(1e-5)
    torch.testing.assert_close(layer.beta, torch.tensor([-1e-5, 1e-5, 0.0, 0.0]))
    # evaluation forwards do not count
    layer.eval()
    layer(x)
    assert (layer.counts == 0).all()


def test_bias_steers_the_selection():
    layer = _layer(r=6, k=2)
    layer.beta.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
    _, idx = layer.gates(torch.randn(4, 12))
    assert (idx.sort(-1).values == torch.tensor([4, 5])).all()


def test_init_equals_base_and_training_moves_beta_through_on_step_end():
    t = tiny("smora")
    method = t.method()
    assert (method.r, method.k, method.alpha, method.bias_update_rate) == (16, 8, 32.0, 1e-5)
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-5, atol=1e-6)
    layers = method.adapted_layers(model)
    positions: dict[str, int] = {}  # token positions each layer saw (the pooler sees only [CLS])
    hooks = [layer.register_forward_hook(lambda mod, inp, out, n=n: positions.__setitem__(n, inp[0].numel() // mod.in_features))
             for n, layer in layers.items()]
    model.train()
    model(**t.batch).loss.backward()
    for h in hooks:
        h.remove()
    counts = {n: layer.counts.clone() for n, layer in layers.items()}
    assert all(counts[n].sum() == 8 * positions[n] for n in layers)  # k selections per position
    method.on_step_end(model, 0, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0))
    for name, layer in layers.items():
        torch.testing.assert_close(layer.beta, 1e-5 * torch.sign(counts[name].mean() - counts[name]))
        assert (layer.counts == 0).all()
    state = method.state_dict()
    assert set(state) == {f"{n}.{k}" for n in layers for k in ("beta", "counts")}


def test_not_mergeable_and_no_delta():
    t = tiny("smora")
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    assert method.mergeable is False
    with pytest.raises(NotImplementedError, match="depends on the input"):
        method.merge(copy.deepcopy(model))
    assert method.delta_weights(model) == {}


def test_trainable_count():
    t = tiny("smora")
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    for name, layer in method.adapted_layers(model).items():
        own = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert own == method.layer_trainable(layer.base) == 16 * (2 * layer.in_features + layer.out_features)
    with pytest.raises(ValueError):
        SMoRA(lr=1e-4, r=4, k=8)
