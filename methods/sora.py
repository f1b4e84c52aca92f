"""SoRA: LoRA with a gate per rank component, sparsified by a proximal (soft-threshold) step; the components whose
gate reaches zero are dropped at merge time, so every layer ends with its own rank."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod


def soft_threshold(x: torch.Tensor, xi: float) -> torch.Tensor:
    """The proximal operator of ξ·‖x‖₁: sign(x)·max(|x| − ξ, 0), element-wise (zero wherever |x| ≤ ξ)."""
    return torch.sign(x) * torch.clamp(x.abs() - xi, min=0.0)


class SparseGateAdamW(torch.optim.AdamW):
    """AdamW, then the soft threshold g ← sign(g)·max(|g| − ξ, 0) on the parameters of every group with
    `soft_threshold` ξ > 0 (the gates). With `threshold_times_lr` the threshold is ξ·lr (the group's scheduled lr).

    The threshold and the flag live in the param groups, and AdamW keeps its moments in `self.state[p]`, so
    state_dict()/load_state_dict() round-trip everything this optimizer needs to continue a run.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in self.param_groups:
            group.setdefault("soft_threshold", 0.0)
            group.setdefault("threshold_times_lr", False)

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                xi = group["soft_threshold"] * (group["lr"] if group["threshold_times_lr"] else 1.0)
                if xi <= 0:
                    continue
                for p in group["params"]:
                    if p.grad is not None:  # as AdamW: a parameter without a gradient takes no step
                        p.copy_(soft_threshold(p, xi))
        return loss


class SoRALinear(AdaptedLinear):
    """y = W0·x + s·B·(g ⊙ A·x), s = α/r; A (r×n), B (m×r) and the gate g (r,) are trainable.

    ΔW = s·B·diag(g)·A = s·Σ_{i: g_i ≠ 0} g_i·b_i·a_iᵀ: components with a zero gate contribute nothing and are
    left out of delta() (the merged weight), so rank(ΔW) ≤ nnz(g).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__(base)
        self.r, self.scaling = int(r), float(alpha) / int(r)
        w = base.weight
        a = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # LoRA's A init, U(±1/√n)
        gate = torch.randn(self.r, generator=generator)  # g ~ N(0, 1), as the reference
        self.A = nn.Parameter(a.to(w.device, w.dtype))  # (r, n)
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (m, r) zero: init == base
        self.gate = nn.Parameter(gate.to(w.device))  # (r,) fp32: the prox step's small thresholds survive bf16
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def active(self) -> torch.Tensor:
        """Indices of the components whose gate is non-zero."""
        return torch.nonzero(self.gate.detach(), as_tuple=True)[0]  # (k,)

    def pruned_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') of the rank-nnz(g) LoRA the paper keeps for inference: B' = s·B[:, I]·diag(g_I), A' = A[I]."""
        keep = self.active()
        b = self.scaling * self.B[:, keep] * self.gate[keep].to(self.B.dtype)  # (m, k)
        return b, self.A[keep]  # (m, k), (k, n)

    def delta(self) -> torch.Tensor:
        b, a = self.pruned_factors()
        return b @ a  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.A) * self.gate  # (..., r) g ⊙ A·x
        return self.base(x) + self.scaling * F.linear(z.to(self.B.dtype), self.B)  # (..., m)


class SoRA(SwapMethod):
    """SoRA: y = W0·x + s·B·(g ⊙ A·x); each training step takes AdamW on A, B, g, then the proximal step
    g ← sign(g)·max(|g| − ξ, 0) on the gates; the loss carries η·mean|g|. Merge drops components with g_i = 0.

    Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023, arXiv 2311.11696;
    reference TsinghuaC3I/SoRA @ c275ac237b68b888a918cf9dad36d3827e46f616 (src/lora.py `LowRankLinear`,
    src/sparse_optimizer.py `SparseAdamW`, src/trainer.py `compute_loss`, run_glue.py,
    scripts/run_glue_sora_no_schedule.sh, config/lora_config.json).

    As in the reference: A kaiming-uniform(a=√5), B = 0, g ~ N(0, 1) (r_max components), s = α/r; the gates have
    their own AdamW group (weight decay 0, lr = `gate_lr`, by default the lr of A and B, under the same warmup/decay
    schedule), and after that group's AdamW step every gate is soft-thresholded with ξ, *not* multiplied by the
    learning rate (the reference's default `SparseAdamW`; its `sparse_optimizer_multiply_lr.py` multiplies, which
    `threshold_times_lr: true` selects). The loss adds η·Σ|g|/#gates over the gates of all layers. Gradient clipping
    covers the gates too (the reference clips model.parameters(); the loop clips the optimizer's parameters).
    The paper describes the gate update as a proximal-gradient step with this soft threshold; a zeroed gate may come
    back if a later gradient step moves it past ξ (the reference behaves the same). After training, the components
    whose gate is zero are eliminated, turning each layer into a LoRA of rank nnz(g): delta() and merge() use only
    those (`SoRALinear.pruned_factors()`), and post_train() reports the surviving ranks.

    Where this differs from the reference:
    - Soft threshold: the reference applies three in-place masks one after the other (g > ξ: g −= ξ; g < −ξ: g += ξ;
      then |g| < ξ: g = 0, tested on the already shrunk values), so gates with ξ < |g| < 2ξ are zeroed instead of
      shrunk and a gate with |g| = ξ exactly is left unchanged. This uses the paper's soft threshold
      sign(g)·max(|g| − ξ, 0).
    - One optimizer with a gate group instead of the reference's two optimizers (and two identical schedulers). The
      gate group uses the loop's AdamW ε (1e-8); the reference's gate optimizer is transformers' AdamW with ε = 1e-6.
    - The gate is a vector (r,) kept in fp32 (the reference: a (1, r) parameter in the model dtype).
    - The trained adapter keeps all r_max components (zero gates included), so saved adapters have a fixed shape
      and load into a freshly wrapped model; pruning happens in delta()/merge().
    - Not implemented: the sparsifying scheduler (the paper's Algorithm 1, the reference's `lambda_schedule`), which
      after the main run continues training in stages with an increasing ξ to trace accuracy against sparsity.
    - The reference's training settings that are not properties of the method (gradient clipping 0.1, weight decay
      0.1 on A and B, 20 epochs of batch 8) are the benchmark's train.* settings here.

    Args:
        lr: learning rate of A and B (AdamW).
        target_modules: module-name suffixes to adapt.
        r: r_max, the number of gated components per layer.
        alpha: scaling numerator; s = alpha / r.
        dropout: dropout on the adapter input.
        sparsity_weight: η, the weight of the loss term η·mean|g| (the reference's `sparse_lambda`).
        threshold: ξ, the soft threshold applied to the gates after each step (the reference's `sparse_lambda_2`).
        threshold_times_lr: threshold with ξ·lr instead of ξ (the reference's alternative optimizer).
        gate_lr: learning rate of the gates; None uses lr (the reference's `sparse_lr` default).
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        sparsity_weight: float = 10.0,
        threshold: float = 3e-4,
        threshold_times_lr: bool = False,
        gate_lr: float | None = None,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"SoRA rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if sparsity_weight < 0 or threshold < 0:
            raise ValueError(f"need sparsity_weight >= 0 and threshold >= 0, got {sparsity_weight}, {threshold}")
        if gate_lr is not None and not gate_lr > 0:
            raise ValueError(f"gate_lr must be > 0 or null, got {gate_lr}")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.sparsity_weight, self.threshold = float(sparsity_weight), float(threshold)
        self.threshold_times_lr = bool(threshold_times_lr)
        self.gate_lr = float(gate_lr) if gate_lr is not None else self.lr

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "sora", name))
        return SoRALinear(base, self.r, self.alpha, self.dropout, generator)

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.r * (base.in_features + base.out_features) + self.r  # A (r×n) + B (m×r) + gate (r)

    def gates(self, model: nn.Module) -> list[nn.Parameter]:
        return [layer.gate for layer in self.adapted_layers(model).values()]  # type: ignore[attr-defined]

    # ---------------------------------------------------------------------------------- optimisation
    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        gate_ids = {id(g) for g in self.gates(model)}
        params = [p for p in self.trainable_parameters(model).values() if id(p) not in gate_ids]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            {"params": self.gates(model), "weight_decay": 0.0, "lr": self.gate_lr,
             "soft_threshold": self.threshold, "threshold_times_lr": self.threshold_times_lr},
        ]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        return SparseGateAdamW(self.param_groups(model, weight_decay), lr=self.lr, betas=betas, eps=eps)

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """η·mean|g| over the gates of every layer (the reference: sparse_lambda·Σ|g| / #gates)."""
        if self.sparsity_weight == 0:
            return None
        gates = torch.cat(self.gates(model))  # (L·r,)
        return self.sparsity_weight * gates.abs().mean()

    # ---------------------------------------------------------------------------------- after training
    def ranks(self, model: nn.Module) -> dict[str, int]:
        """{layer: nnz(g)}, the rank each layer keeps after pruning."""
        layers = self.adapted_layers(model)
        return {name: int(layer.gate.count_nonzero()) for name, layer in layers.items()}  # type: ignore[attr-defined]

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        ranks = list(self.ranks(model).values())
        return {
            "sora_nonzero_gates": float(sum(ranks)),
            "sora_gate_density": sum(ranks) / (self.r * len(ranks)),
            "sora_rank_per_layer_mean": sum(ranks) / len(ranks),
            "sora_rank_per_layer_min": float(min(ranks)),
            "sora_rank_per_layer_max": float(max(ranks)),
        }

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = s·B_I·diag(g_I)·A_I over the non-zero gates I, in float64 (cast to fp32): rank ≤ nnz(g)."""
        out = {}
        with torch.no_grad():
            for name, layer in self.adapted_layers(model).items():
                keep = layer.active()  # type: ignore[operator]
                b = layer.B.detach().double().cpu()[:, keep.cpu()]  # (m, k)
                a = layer.A.detach().double().cpu()[keep.cpu()]  # (k, n)
                g = layer.gate.detach().double().cpu()[keep.cpu()]  # (k,)
                out[name] = (layer.scaling * (b * g) @ a).float()  # (m, n)
        return out
