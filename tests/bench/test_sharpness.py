"""bench/sharpness.py: λ_max of the loss Hessian in the trainable parameters by power iteration on HVPs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bench.sharpness import Sharpness, top_hessian_eigenvalue


# ---------------------------------------------------------------------------------------------------- helpers
class Quadratic(nn.Module):
    """0.5·xᵀAx with A = Q diag(eigs) Qᵀ, Q a random orthogonal matrix: its Hessian is A."""

    def __init__(self, eigs: list[float], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
        self.register_buffer("a", (q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T).float())
        self.x = nn.Parameter(torch.randn(len(eigs), generator=g))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ self.a @ self.x


def quad_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return m()


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(6, 8), nn.Linear(8, 3), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def ce_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b["x"]), b["y"])


def mlp_and_batches(seed: int = 0, n_batches: int = 2) -> tuple[MLP, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = MLP()
    g = torch.Generator().manual_seed(seed + 100)
    batches = [{"x": torch.randn(16, 6, generator=g) * 2, "y": torch.randint(0, 3, (16,), generator=g)}
               for _ in range(n_batches)]
    return model, batches


def explicit_hessian(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[str],
                                                                                        list[int]]:
    """The Hessian of the mean loss over all parameters, flattened in named_parameters() order (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).double()
    model64 = MLP().double()

    def f(flat: torch.Tensor) -> torch.Tensor:
        weights = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        logits = [functional_call(model64, weights, (b["x"].double(),)) for b in batches]
        return sum(nn.functional.cross_entropy(z, b["y"]) for z, b in zip(logits, batches)) / len(batches)

    return torch.autograd.functional.hessian(f, flat0), names, sizes


# ---------------------------------------------------------------------------------------------------- quadratic
def test_quadratic_recovers_the_top_eigenvalue() -> None:
    model = Quadratic([5.0, 2.0, 1.0, 0.1])
    s = top_hessian_eigenvalue(model, dict(model.named_parameters()), [{}], quad_loss, iters=200, tol=1e-7)
    assert isinstance(s, Sharpness)
    assert s.converged
    assert abs(s.lambda_max - 5.0) < 1e-3
    assert s.iters < 200 and s.batches == 1 and s.seconds >= 0
    # the defaults (20 iterations, tol 1e-3) already land within 1%
    d = top_hessian_eigenvalue(model, dict(model.named_parameters()), [{}], quad_loss)
    assert d.converged and abs(d.lambda_max - 5.0) < 0.05
    # the eigenvector is the one of eigenvalue 5, unit norm
    v = d.eigenvector["x"]
    assert abs(float(v.norm()) - 1.0) < 1e-5
    assert float(torch.linalg.norm(model.a @ v - 5.0 * v)) < 0.1
    record = d.as_record()
    assert json.loads(json.dumps(record)) == record
    assert record["lambda_max"] == d.lambda_max and record["converged"] is True and record["batches"] == 1


def test_negative_dominant_eigenvalue_is_returned_signed() -> None:
    model = Quadratic([-5.0, 2.0, 1.0, 0.1], seed=1)
    s = top_hessian_eigenvalue(model, dict(model.named_parameters()), [{}], quad_loss, iters=200, tol=1e-7)
    assert s.converged
    assert abs(s.lambda_max - (-5.0)) < 1e-3


def test_seed_picks_the_start_vector_and_is_reproducible() -> None:
    model = Quadratic([5.0, 4.9, 1.0, 0.1])  # small gap: few iterations leave a seed-dependent estimate
    p = dict(model.named_parameters())
    a = top_hessian_eigenvalue(model, p, [{}], quad_loss, iters=2, seed=3)
    b = top_hessian_eigenvalue(model, p, [{}], quad_loss, iters=2, seed=3)
    c = top_hessian_eigenvalue(model, p, [{}], quad_loss, iters=2, seed=4)
    assert a.lambda_max == b.lambda_max
    assert c.lambda_max != a.lambda_max
    assert a.iters == 2 and not a.converged


# ---------------------------------------------------------------------------------------------------- MLP
def test_mlp_matches_the_explicit_hessian_and_its_last_layer_block() -> None:
    model, batches = mlp_and_batches()
    h, names, sizes = explicit_hessian(model, batches)
    eig = torch.linalg.eigvalsh(h)
    assert eig[-1] > abs(eig[0])  # the dominant eigenvalue is the top one, as power iteration needs

    s = top_hessian_eigenvalue(model, dict(model.named_parameters()), batches, ce_loss, iters=500, tol=1e-8)
    assert s.converged
    assert s.lambda_max == pytest.approx(float(eig[-1]), rel=0.01)

    # only the last layer: the fc2 block of the same Hessian
    offsets = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
    idx = torch.cat([torch.arange(offsets[n], offsets[n] + k) for n, k in zip(names, sizes) if n.startswith("fc2.")])
    block = torch.linalg.eigvalsh(h[idx][:, idx])
    last = {n: p for n, p in model.named_parameters() if n.startswith("fc2.")}
    sub = top_hessian_eigenvalue(model, last, batches, ce_loss, iters=500, tol=1e-8)
    assert sub.converged
    assert sub.lambda_max == pytest.approx(float(block[-1]), rel=0.01)
    assert abs(sub.lambda_max - s.lambda_max) > 0.02 * s.lambda_max  # the block really is a different matrix
    assert set(sub.eigenvector) == set(last)


def test_loss_is_averaged_over_batches() -> None:
    model, (batch, other) = mlp_and_batches()
    p = dict(model.named_parameters())
    one = top_hessian_eigenvalue(model, p, [batch], ce_loss, iters=300, tol=1e-8)
    two = top_hessian_eigenvalue(model, p, [batch, batch], ce_loss, iters=300, tol=1e-8)
    assert two.batches == 2
    assert two.lambda_max == pytest.approx(one.lambda_max, rel=1e-4)
    mixed = top_hessian_eigenvalue(model, p, [batch, other], ce_loss, iters=300, tol=1e-8)
    assert abs(mixed.lambda_max - one.lambda_max) > 1e-3 * one.lambda_max  # a different batch does count


def test_params_that_do_not_reach_the_loss_have_zero_curvature() -> None:
    model, batches = mlp_and_batches()
    base = top_hessian_eigenvalue(model, dict(model.named_parameters()), batches, ce_loss, iters=300, tol=1e-8)
    model.unused = nn.Parameter(torch.ones(5))
    s = top_hessian_eigenvalue(model, dict(model.named_parameters()), batches, ce_loss, iters=300, tol=1e-8)
    assert s.lambda_max == pytest.approx(base.lambda_max, rel=1e-4)
    assert float(s.eigenvector["unused"].abs().max()) == 0.0
    alone = top_hessian_eigenvalue(model, {"unused": model.unused}, batches, ce_loss)
    assert alone.lambda_max == 0.0 and alone.converged and alone.iters == 1


def test_no_side_effects_on_rng_modes_and_grads() -> None:
    model, batches = mlp_and_batches()
    model.drop.p = 0.5
    model.train()
    model.fc1.eval()  # a submodule deliberately in eval mode stays so
    model.fc2.bias.grad = torch.full((3,), 7.0)
    kept = model.fc2.bias.grad
    seen: list[bool] = []

    def noisy_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(any(x.training for x in m.modules()))
        return ce_loss(m, b) + 0.0 * torch.randn(()).item()  # draws from the global RNG

    rng = torch.get_rng_state()
    params = {n: p for n, p in model.named_parameters() if n != "fc2.bias"}
    top_hessian_eigenvalue(model, params, batches, noisy_loss, iters=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert seen and not any(seen)  # eval mode (no dropout) during the estimate
    assert model.training and model.drop.training and model.fc2.training and not model.fc1.training
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc2.bias")
    assert model.fc2.bias.grad is kept and torch.equal(kept, torch.full((3,), 7.0))


def test_an_op_without_double_backward_names_eager_attention() -> None:
    """A fused attention kernel called directly (as flash_attention_2 does) is out of reach of the math-SDPA switch:
    its missing double backward must surface as an error that names attn_implementation="eager"."""

    class FusedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = (x @ self.w).view(1, 1, x.shape[0], 8)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].pow(2).sum()

    model = FusedAttention().train()
    batch = {"x": torch.randn(5, 8, generator=torch.Generator().manual_seed(1))}
    with pytest.raises(RuntimeError, match='attn_implementation="eager"'):
        top_hessian_eigenvalue(model, dict(model.named_parameters()), [batch], lambda m, b: m(b["x"]), iters=3)
    assert model.training and model.w.grad is None


def test_bad_arguments_are_refused() -> None:
    model, batches = mlp_and_batches()
    with pytest.raises(ValueError, match="batch"):
        top_hessian_eigenvalue(model, dict(model.named_parameters()), [], ce_loss)
    with pytest.raises(ValueError, match="parameter"):
        top_hessian_eigenvalue(model, {}, batches, ce_loss)
    model.fc1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="fc1.weight"):
        top_hessian_eigenvalue(model, dict(model.named_parameters()), batches, ce_loss)


# ---------------------------------------------------------------------------------------------------- tiny BERT
@pytest.fixture(scope="module")
def tiny_bert_lora() -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # initializer_range 0.1 / lora_alpha 16: at BERT's default 0.02 a random net's outputs barely depend on the
    # adapters and the LoRA Hessian at init is a tiny ± pair (B = 0 leaves only the A-B cross block and a small
    # B-B block), where power iteration has no dominant direction.
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, num_labels=2, initializer_range=0.1)
    base = BertForSequenceClassification(cfg)
    assert base.config._attn_implementation == "sdpa"  # the default kernel: double backward must work through it
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=16, target_modules=["query", "value"]))
    model.train()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 100, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=g)})
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    return model, params, batches


def hf_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return m(**b).loss


def test_tiny_bert_lora_matches_a_finite_difference_hvp(tiny_bert_lora) -> None:  # type: ignore[no-untyped-def]
    model, params, batches = tiny_bert_lora
    assert len(params) == 8 and all(p.requires_grad for p in params.values())
    rng = torch.get_rng_state()
    s = top_hessian_eigenvalue(model, params, batches, hf_loss, iters=100, tol=1e-6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert math.isfinite(s.lambda_max) and s.lambda_max > 0 and s.converged

    names = list(params)
    v = [s.eigenvector[n] for n in names]

    def grad_at(eps: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for n in names:
                params[n].add_(s.eigenvector[n], alpha=eps)
        try:
            model.eval()
            loss = sum(hf_loss(model, b) for b in batches) / len(batches)
            return list(torch.autograd.grad(loss, [params[n] for n in names]))
        finally:
            model.train()
            with torch.no_grad():
                for n in names:
                    params[n].add_(s.eigenvector[n], alpha=-eps)

    eps = 1e-2
    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps))]
    rayleigh = sum(float((f * x).sum()) for f, x in zip(fd, v))
    assert rayleigh == pytest.approx(s.lambda_max, rel=0.02)
    residual = math.sqrt(sum(float(((f - s.lambda_max * x) ** 2).sum()) for f, x in zip(fd, v)))
    assert residual < 0.05 * s.lambda_max  # Hv ≈ λ v: the returned v is an eigenvector
