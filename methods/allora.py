"""ALLoRA: LoRA without dropout and without the scaling factor, whose gradients are scaled row by row by a
coefficient that shrinks as the row's ℓ2 norm grows (an adaptive learning rate)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from methods.lora import LoRA

ApplyTo = Literal["gradient", "update"]


def row_multiplier(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """c_i = 1/√(‖θ_i‖² + 1/η²) for every row θ_i of `weight` (computed in fp32): η for a zero row, decreasing in
    ‖θ_i‖, ≈ 1/‖θ_i‖ once ‖θ_i‖ ≫ 1/η."""
    sq = weight.detach().float().pow(2).sum(dim=1)  # (rows,)
    return torch.rsqrt(sq + 1.0 / eta**2)  # (rows,)


class RowScaledAdamW(torch.optim.AdamW):
    """AdamW whose update of every parameter in a group with `row_eta` η > 0 is multiplied, row by row, by
    c_i = 1/√(‖θ_i‖² + 1/η²) evaluated at the weights before the step: θ ← θ + c ⊙ Δθ_AdamW.

    All state is AdamW's (in `self.state[p]`) and η is a param-group entry, so state_dict() round-trips it.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in self.param_groups:
            group.setdefault("row_eta", 0.0)

    def step(self, closure: Any = None) -> Any:
        scaled = [(p, g["row_eta"]) for g in self.param_groups if g["row_eta"] > 0 for p in g["params"]
                  if p.grad is not None]
        before = [(p, p.detach().clone(), row_multiplier(p, eta)) for p, eta in scaled]
        loss = super().step(closure)
        with torch.no_grad():
            for p, old, c in before:
                p.copy_(old + c.to(p.dtype)[:, None] * (p - old))  # (rows, cols)
        return loss


class ALLoRA(LoRA):
    """ALLoRA: y = W0·x + B·A·x (no scaling factor, no dropout); after backward each row θ_i of A (r×n) and of
    B (m×r) has its gradient multiplied by c_i = 1/√(‖θ_i‖² + 1/η²), then AdamW steps as usual.

    Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692;
    no public code; follows the paper as far as it could be read, and specs/methods.md's reconstruction beyond that.

    What was verified against the paper (its abstract, arXiv v1 and the ICLR 2025 OpenReview submission; the method
    section could not be retrieved): ALLoRA is LoRA with Dropout removed and the scaling factor removed (here
    s = α/r = 1 and dropout 0: two hyper-parameters fewer), and "the per sample and per parameter gradients" are
    scaled "with a coefficient inversely proportional to parameters' ℓ2 norm", which gives the zero-initialised factor
    a large step when it starts at 0 (the paper's second flaw: slow escape of B from 0). Because the coefficient
    depends on the weights only, scaling every per-sample gradient equals scaling the batch gradient, so one
    rescaling in on_after_backward (after the accumulated micro-batches) is exact.

    What remains a reconstruction (specs/methods.md), not checked against the text: the exact form
    1/√(‖θ‖² + 1/η²) (a norm-inverse kept finite at θ = 0, where it equals η); that "parameter" means a row of each
    factor as PyTorch stores it (one output unit: a row of A is one rank component's input direction, a row of B one
    output unit's r coefficients) rather than a whole matrix or a column; and the value of η (η = 10 here is our
    choice). Also uncertain is the optimizer the coefficient meets. Under (S)GD, scaling the gradient is exactly a
    per-row learning rate. Under AdamW it is not: Adam is invariant to a constant per-coordinate rescaling of the
    gradient, so what survives is the change of c over time measured against Adam's second-moment memory (a row
    whose norm grows gets steps smaller than plain LoRA's, e.g. B after it has left 0). `apply_to: update` reads the
    title literally instead and multiplies AdamW's update of each row by c_i (RowScaledAdamW; decoupled weight decay
    included), which Adam cannot normalise away. The default, `gradient`, is the spec's rule.

    Clipping: the loop clips the gradient norm after on_after_backward, i.e. it clips the scaled gradient.

    Args:
        lr: learning rate (AdamW).
        target_modules: module-name suffixes to adapt.
        r: rank.
        eta: η, the multiplier of a zero row; 1/η² keeps the coefficient finite.
        apply_to: gradient (scale the gradient in on_after_backward; the spec) or update (scale AdamW's step).
    """

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        eta: float = 10.0,
        apply_to: ApplyTo = "gradient",
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=float(r), dropout=0.0)  # s = 1
        if not eta > 0:
            raise ValueError(f"ALLoRA eta must be > 0, got {eta}")
        if apply_to not in ("gradient", "update"):
            raise ValueError(f"ALLoRA apply_to must be gradient or update, got {apply_to!r}")
        self.eta, self.apply_to = float(eta), apply_to

    def factor_weights(self, model: nn.Module) -> list[nn.Parameter]:
        """A (r×n) and B (m×r) of every adapted layer: the parameters whose rows are rescaled."""
        return [w for layer in self.lora_layers(model).values()
                for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        if self.apply_to != "gradient":
            return
        with torch.no_grad():
            for w in self.factor_weights(model):
                if w.grad is not None:
                    w.grad.mul_(row_multiplier(w, self.eta).to(w.grad.dtype)[:, None])  # (rows, cols)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        factor_ids = {id(w) for w in self.factor_weights(model)}
        params = list(self.trainable_parameters(model).values())
        groups = [
            {"params": [p for p in params if id(p) in factor_ids], "weight_decay": weight_decay,
             "row_eta": self.eta if self.apply_to == "update" else 0.0},
            {"params": [p for p in params if id(p) not in factor_ids and p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in factor_ids and p.ndim < 2], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        if self.apply_to == "gradient":
            return super().make_optimizer(model, weight_decay=weight_decay, betas=betas, eps=eps)  # plain AdamW
        return RowScaledAdamW(self.param_groups(model, weight_decay), lr=self.lr, betas=betas, eps=eps)
