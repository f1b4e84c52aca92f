"""LoRA-GGPO's properties (specs/methods.md, group C): σ = 0 is LoRA step for step; the frozen weights are restored
bit-identically after every perturbed pass; ε has the formula's row-wise scale σ/√n·(‖W'_i‖² + β‖∇W'_i‖²)^½."""

from __future__ import annotations

import io
import math

import torch

from methods.lora_ggpo import LoRAGGPO
from tests.helpers import tiny, train_steps, wrapped


def base_weights(method: LoRAGGPO, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight for name, layer in method.lora_layers(model).items()}


def perturbed_pass(method: LoRAGGPO, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> None:
    """What the loop does between two optimizer steps: perturb, forward, backward, restore."""
    model.zero_grad()
    method.on_step_begin(model, step)
    model(**batch).loss.backward()
    method.on_after_backward(model, step)


def trained(name: str, extra: list[str]) -> tuple[list[float], dict[str, torch.Tensor]]:
    t = tiny(name, extra=extra)
    torch.manual_seed(0)  # same A init for both methods
    method, model = wrapped(t)
    torch.manual_seed(1)  # same dropout masks
    result = train_steps(model, method, t.loader, steps=4)
    return [row["loss"] for row in result.curve], {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sigma_zero_is_lora_step_for_step():
    lora_losses, lora_params = trained("lora", [])
    ggpo_losses, ggpo_params = trained("lora_ggpo", ["method.sigma=0"])
    assert ggpo_losses == lora_losses
    assert lora_params.keys() == ggpo_params.keys()
    for name, p in lora_params.items():
        assert torch.equal(p, ggpo_params[name]), name
    perturbed_losses, perturbed_params = trained("lora_ggpo", ["method.sigma=0.5"])  # the perturbation does act
    assert perturbed_losses[0] != lora_losses[0]
    assert any(not torch.equal(p, perturbed_params[n]) for n, p in lora_params.items() if "lora_B" in n)


def test_frozen_weights_are_restored_bit_identically_after_each_perturbed_pass():
    t = tiny("lora_ggpo", extra=["method.sigma=0.5"])
    method, model = wrapped(t)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = method.make_optimizer(model)
    for step, batch in enumerate([t.batch, *t.calibration]):
        clean = {n: w.detach().clone() for n, w in base_weights(method, model).items()}
        method.on_step_begin(model, step)
        for name, w in base_weights(method, model).items():
            assert not torch.equal(w, clean[name]), f"step {step}: {name} was not perturbed"
        model.zero_grad()
        model(**batch).loss.backward()
        method.on_after_backward(model, step)
        optimizer.step()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[name]), f"step {step}: {name} changed"


def test_perturbation_has_the_row_wise_scale_of_the_formula():
    sigma, beta = 0.5, 2.0e3
    t = tiny("lora_ggpo", extra=[f"method.sigma={sigma}", f"method.beta={beta}"])
    method, model = wrapped(t)
    layers = method.lora_layers(model)
    gen = torch.Generator().manual_seed(0)
    grad_sq = {}
    with torch.no_grad():
        for name, layer in layers.items():  # make ‖W'_i‖ and ‖∇W'_i‖ vary a lot from row to row
            w0 = layer.get_base_layer().weight  # (m, n)
            m = w0.shape[0]
            w0.mul_(torch.linspace(0.2, 5.0, m)[torch.randperm(m, generator=gen)][:, None])
            layer.lora_B["default"].weight.normal_(0, 0.05, generator=gen)  # W' = W0 + s·B·A, B ≠ 0
            grad_sq[name] = torch.rand(m, generator=gen) * w0.pow(2).sum(1).mean() / beta * 4
    method.load_state_dict({"grad_sq_norms": grad_sq})
    expected, clean = {}, {}
    for name, layer in layers.items():
        w0 = layer.get_base_layer().weight
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        merged = (w0.double() + s * b.double() @ a.double()).detach()  # (m, n)
        expected[name] = sigma / math.sqrt(w0.shape[1]) * (merged.pow(2).sum(1) + beta * grad_sq[name].double()).sqrt()
        clean[name] = w0.detach().clone()
    method.on_step_begin(model, step=7)
    z_all, ratios = [], []
    for name, w in base_weights(method, model).items():
        eps = w.double() - clean[name].double()  # (m, n)
        row_std = eps.pow(2).mean(1).sqrt()  # (m,)
        ratios.append(row_std / expected[name])
        z_all.append((eps / expected[name][:, None]).flatten())
    method.on_after_backward(model, step=7)
    z, ratios = torch.cat(z_all), torch.cat(ratios)
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 0.03, z.var().item()  # standardised by the formula's scale: unit variance
    assert (ratios - 1).abs().median() < 0.1, ratios  # and row by row, where the scale spans ~25×
    assert (ratios - 1).abs().max() < 0.5, ratios
    spread = torch.cat(list(expected.values()))
    assert spread.max() / spread.min() > 10


def test_gradient_norms_come_from_the_equivalent_gradient_and_survive_state_dict():
    t = tiny("lora_ggpo", extra=["method.sigma=0.5"])
    method, model = wrapped(t)
    assert method.state_dict() == {"grad_sq_norms": {}}
    perturbed_pass(method, model, t.batch, step=0)
    for name, layer in method.lora_layers(model).items():
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        grad = s * (b @ a.grad + b.grad @ a)  # (m, n)
        torch.testing.assert_close(method.state_dict()["grad_sq_norms"][name], grad.pow(2).sum(1))
        assert grad.abs().max() > 0
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = t.method()  # a new method object over the same model: only the saved state carries over
    fresh.seed = method.seed
    fresh.load_state_dict(torch.load(buffer))
    noises = []
    for m in (method, fresh):  # same state, same step: the same ε
        clean = {n: w.detach().clone() for n, w in base_weights(m, model).items()}
        m.on_step_begin(model, step=1)
        noises.append({n: w.detach() - clean[n] for n, w in base_weights(m, model).items()})
        m.on_after_backward(model, step=1)
    for name in noises[0]:
        assert torch.equal(noises[0][name], noises[1][name])
    other = t.method()  # without the saved gradient norms, step 1's ε differs
    other.seed = method.seed
    clean = {n: w.detach().clone() for n, w in base_weights(other, model).items()}
    other.on_step_begin(model, step=1)
    assert any(not torch.equal(w.detach() - clean[n], noises[0][n]) for n, w in base_weights(other, model).items())
    other.on_after_backward(model, step=1)


def test_unremoved_perturbation_is_an_error():
    t = tiny("lora_ggpo")
    method, model = wrapped(t)
    method.on_step_begin(model, 0)
    try:
        method.on_step_begin(model, 1)
    except RuntimeError as err:
        assert "never removed" in str(err)
    else:
        raise AssertionError("a second perturbation on top of the first was accepted")
