"""Properties of the PEFT LoRA family beyond the shared checklist (specs/methods.md, group A)."""

from __future__ import annotations

import torch

from tests.helpers import tiny, train_steps, wrapped


def test_lora_delta_has_rank_at_most_r():
    t = tiny("lora", extra=["method.r=2"])
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=3)
    for name, d in method.delta_weights(model).items():
        assert torch.linalg.matrix_rank(d.double(), rtol=1e-6) <= 2, name


def test_dora_merged_rows_have_the_magnitude_norms():
    t = tiny("dora")
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=3)
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_magnitude_vector")
                   and "default" in getattr(m, "lora_magnitude_vector", {})}
    merged = method.merge(model)
    assert lora_layers
    for name, layer in lora_layers.items():
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()  # (m,)
        row_norms = merged.get_submodule(name).weight.detach().norm(dim=1)  # (m,)
        torch.testing.assert_close(row_norms, magnitude, rtol=1e-4, atol=1e-5)


def test_dora_starts_with_magnitude_equal_to_w0_row_norms():
    t = tiny("dora")
    method, model = wrapped(t)
    for n, m in model.named_modules():
        if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
            w0 = t.base.get_submodule(n.removeprefix("base_model.model.")).weight
            torch.testing.assert_close(m.lora_magnitude_vector["default"].weight.detach(), w0.norm(dim=1))


def test_pissa_residual_spectral_norm_is_the_next_singular_value():
    t = tiny("pissa", extra=["method.r=4"])
    method, model = wrapped(t)
    for name in method.target_layers(t.base, t.ctx):
        w0 = t.base.get_submodule(name).weight.detach().double()
        residual = model.base_model.model.get_submodule(name).base_layer.weight.detach().double()
        sigma = torch.linalg.svdvals(w0)
        torch.testing.assert_close(torch.linalg.matrix_norm(residual, ord=2), sigma[4], rtol=1e-4, atol=1e-5)


def test_full_fine_tuning_trains_everything():
    t = tiny("full")
    method, model = wrapped(t)
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == sum(p.numel() for p in t.base.parameters())
