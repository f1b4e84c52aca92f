"""Properties of SVFit, SALT and LoLDU beyond the shared checklist (specs/methods.md, group A)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from methods.svd_reparam import LoLDU, LoLDULinear, SALTLinear, SVFitLinear
from tests.helpers import tiny, train_steps, wrapped


def _layers(model, kind):
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


# ============================================================================================== SVFit
def test_svfit_sigma_gradient_is_the_weight_gradient_projected_on_singular_pairs():
    """∂L/∂σ_i = u_iᵀ·G·v_i, with G = ∂L/∂W taken on the merged model (plain Linears), away from init."""
    t = tiny("svfit")
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=2)  # σ ≠ σ0: the identity holds at any point, not just at init
    merged = method.merge(copy.deepcopy(model))
    for m in (model, merged):
        m.eval()  # no dropout: both models compute the same function
        m.zero_grad()
    layers = _layers(model, SVFitLinear)
    for name in layers:
        merged.get_submodule(name).weight.requires_grad_(True)
    model(**t.batch).loss.backward()
    merged(**t.batch).loss.backward()
    assert layers
    for name, layer in layers.items():
        g = merged.get_submodule(name).weight.grad.double()  # (m, n)
        expected = torch.einsum("mi,mn,ni->i", layer.u.double(), g, layer.v.double())  # (r,)
        torch.testing.assert_close(layer.sigma.grad.double(), expected, rtol=1e-3, atol=1e-7)


def test_svfit_starts_at_w0_and_truncated_residual_has_the_next_singular_value():
    t = tiny("svfit", extra=["method.r=3"])
    method, model = wrapped(t)
    for name, layer in _layers(model, SVFitLinear).items():
        w0 = t.base.get_submodule(name).weight.detach()
        assert torch.equal(layer.weight().detach(), w0), "init must be W0 bit for bit"
        assert layer.sigma.shape == (3,)
        sigma = torch.linalg.svdvals(w0.double())
        torch.testing.assert_close(layer.sigma.detach().double(), sigma[:3], rtol=1e-6, atol=1e-7)
        residual = layer.residual().detach().double()  # W_e = W0 − U_r Σ_r V_rᵀ
        torch.testing.assert_close(torch.linalg.matrix_norm(residual, ord=2), sigma[3], rtol=1e-4, atol=1e-6)


def test_svfit_default_trains_every_singular_value():
    t = tiny("svfit")
    method, model = wrapped(t)
    for name, layer in _layers(model, SVFitLinear).items():
        base = t.base.get_submodule(name)
        assert layer.sigma.numel() == min(base.in_features, base.out_features)
        torch.testing.assert_close(layer.residual().detach(), torch.zeros_like(base.weight), rtol=0, atol=1e-5)


# =============================================================================================== SALT
def _salt_paper_weight(layer: SALTLinear) -> torch.Tensor:
    """U·ReLU(Σ')·Vᵀ in float64, with Σ' the full p×p matrix of the paper."""
    return layer.u.double() @ torch.relu(layer.sigma_prime().detach().double()) @ layer.v.double().mT


def test_salt_init_reproduces_w0():
    t = tiny("salt")
    method, model = wrapped(t)
    for name, layer in _layers(model, SALTLinear).items():
        w0 = t.base.get_submodule(name).weight.detach()
        assert torch.equal(layer.weight().detach(), w0), "init must be W0 bit for bit"
        # the paper's own form U·ReLU(Σ)·Vᵀ reproduces W0 up to the fp32 rounding of the stored factors
        torch.testing.assert_close(_salt_paper_weight(layer), w0.double(), rtol=0, atol=1e-6)
        assert torch.equal(layer.y.detach(), torch.zeros_like(layer.y))
        bound = math.sqrt(6 / layer.x.shape[1])  # kaiming-uniform, relu gain, fan_in = r_lora
        assert layer.x.abs().max() <= bound and layer.x.std() > 0.3 * bound


@pytest.mark.parametrize("ratio,r_lora", [(0.1, 4), (0.25, 3), (0.0, 2), (1.0, 4)])
def test_salt_trainable_count_formula(ratio, r_lora):
    t = tiny("salt", extra=[f"method.ratio={ratio}", f"method.r_lora={r_lora}"])
    method, model = wrapped(t)
    for name, layer in _layers(model, SALTLinear).items():
        base = t.base.get_submodule(name)
        p = min(base.in_features, base.out_features)
        k = max(1, math.floor(ratio * p))  # the reference keeps at least one scaled value
        assert (layer.scale.numel(), layer.shift.numel()) == (k, k)
        assert layer.x.shape == (p - k, r_lora) and layer.y.shape == (r_lora, p - k)
        assert method.layer_trainable(base) == 2 * k + 2 * (p - k) * r_lora
    n = sum(p.numel() for p in method.trainable_parameters(model).values())
    assert n == method.expected_trainable(copy.deepcopy(t.base), t.ctx)
    train_steps(model, method, t.loader, steps=1)  # also with an empty tail (ratio 1) or a single scaled value (0)


def test_salt_weight_is_u_relu_sigma_prime_vt_with_relu_on_every_entry():
    """After arbitrary a, b, X, Y (some singular values and tail entries pushed negative) the layer's weight equals the
    paper's U·ReLU(Σ')·Vᵀ, so the block-wise evaluation applies the ReLU exactly where the reference does."""
    t = tiny("salt", extra=["method.ratio=0.25"])
    method, model = wrapped(t)
    g = torch.Generator().manual_seed(1)
    for layer in _layers(model, SALTLinear).values():
        with torch.no_grad():
            layer.scale.copy_(torch.randn(layer.scale.shape, generator=g) * 2)  # some a⊙σ + b < 0: clipped
            layer.shift.copy_(torch.randn(layer.shift.shape, generator=g) * 0.1)
            layer.y.copy_(torch.randn(layer.y.shape, generator=g) * 0.1)
        assert (layer.sigma_prime() < 0).any(), "the perturbation must exercise the ReLU"
        torch.testing.assert_close(layer.weight().detach().double(), _salt_paper_weight(layer), rtol=0, atol=1e-5)


def test_salt_regulariser():
    t = tiny("salt", extra=["method.reg_weight=0.5"])
    method, model = wrapped(t)
    assert method.extra_loss(model, t.batch, None).item() == 0.0  # a = 1, b = 0, Y = 0
    train_steps(model, method, t.loader, steps=2)
    with torch.no_grad():
        layers = _layers(model, SALTLinear).values()
        expected = 0.5 * sum(float(l.top_delta().norm() + (l.x @ l.y).norm()) for l in layers)
    assert method.extra_loss(model, t.batch, None).item() == pytest.approx(expected, rel=1e-5)
    assert tiny("salt").method().extra_loss(model, t.batch, None) is None  # default weight 0 (the reference's)


# ============================================================================================== LoLDU
def test_loldu_full_rank_factors_reconstruct_w0():
    t = tiny("loldu")
    method, model = wrapped(t)
    for name, layer in _layers(model, LoLDULinear).items():
        w0 = t.base.get_submodule(name).weight.detach().double()
        p = min(w0.shape)
        assert layer.z.numel() == p and layer.scaling == pytest.approx(1.0 / p)  # s = α/r, α = 1
        pldu = (layer.pl.double() * layer.z0.double()) @ layer.ur.double()  # P·L·D·U
        torch.testing.assert_close(pldu, w0, rtol=0, atol=1e-6)
        # W_res = W0 − s·P·L·D·U = (1 − s)·W0 at full rank
        torch.testing.assert_close(layer.residual().detach().double(), (1 - layer.scaling) * w0, rtol=0, atol=1e-6)
        assert torch.equal(layer.weight().detach(), t.base.get_submodule(name).weight.detach())


def test_loldu_full_rank_with_unit_scaling_leaves_no_residual():
    t = tiny("loldu")
    width = t.base.config.hidden_size  # every adapted tiny-BERT layer has min(m, n) = hidden size
    method = LoLDU(lr=1e-2, alpha=float(width))  # α = r: s = 1
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    for layer in _layers(model, LoLDULinear).values():
        assert layer.z.numel() == width and layer.scaling == 1.0
        torch.testing.assert_close(layer.residual().detach(), torch.zeros_like(layer.base.weight), rtol=0, atol=1e-6)


def test_loldu_keeps_the_first_r_pivots_and_merges_to_w_res_plus_s_pldu():
    t = tiny("loldu", extra=["method.r=4", "method.alpha=2"])
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=2)
    layers = _layers(model, LoLDULinear)
    for name, layer in layers.items():
        w0 = t.base.get_submodule(name).weight.detach().double()
        perm, lower, upper = torch.linalg.lu(w0)
        d = torch.diagonal(upper)
        # the first r columns of P·L, the first r rows of D⁻¹·U and the first r pivots (elimination order)
        torch.testing.assert_close(layer.pl.double(), (perm @ lower)[:, :4], rtol=0, atol=1e-7)
        torch.testing.assert_close(layer.ur.double(), upper[:4] / d[:4, None], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.z0.double(), d[:4], rtol=1e-6, atol=1e-7)
        assert torch.allclose(torch.diagonal(layer.ur), torch.ones(4)), "U must be unit-diagonal"
        assert layer.scaling == 0.5 and layer.z.shape == (4,)
        assert not torch.equal(layer.z.detach(), layer.z0), "training must move z"
        # merge rule of the paper: W_res + s·P·L_r·diag(z)·U_r
        w_res = w0 - 0.5 * (perm @ lower)[:, :4] @ torch.diag(d[:4]) @ (upper[:4] / d[:4, None])
        paper = w_res + 0.5 * (layer.pl.double() * layer.z.detach().double()) @ layer.ur.double()
        torch.testing.assert_close(method.merge(copy.deepcopy(model)).get_submodule(name).weight.double(), paper,
                                   rtol=0, atol=1e-5)
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == (
        4 * len(layers) + sum(p.numel() for h in t.ctx.head_modules for p in t.base.get_submodule(h).parameters()))


# ============================================================================================= common
@pytest.mark.parametrize("name,trained", [("svfit", {"sigma"}), ("salt", {"scale", "shift", "x", "y"}), ("loldu", {"z"})])
def test_only_the_spec_tensors_train_and_factors_are_buffers(name, trained):
    t = tiny(name)
    method, model = wrapped(t)
    heads = tuple(h + "." for h in t.ctx.head_modules)
    adapter = {n.rpartition(".")[2] for n in method.trainable_parameters(model) if not n.startswith(heads)}
    assert adapter == trained
    for layer in method.adapted_layers(model).values():
        assert not any(p.requires_grad for p in layer.base.parameters())
        assert all(not b.requires_grad for b in layer.buffers())
        assert not any(n.startswith(("u", "v", "pl", "ur")) for n in layer.state_dict()), "factors are not saved"
