"""LoRA-GGPO: LoRA trained at randomly perturbed weights whose row-wise scale follows the weight and gradient norms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from methods.base import WrapContext
from methods.lora import LoRA


class LoRAGGPO(LoRA):
    """LoRA-GGPO: LoRA whose forward and backward passes run at W' + ε, with W' = W0 + s·B·A and ε drawn afresh each
    step, row by row (output unit i of every adapted layer, n = in_features):

        ε_ij ~ N(0, σ²/n · (‖W'_i,:‖² + β·‖∇W'_i,:‖²))

    ε is added to the frozen W0 before the step's forward passes (on_step_begin) and removed after the backward
    (on_after_backward) by restoring a copy of W0, so W0 is bit-identical after every step and the optimizer steps
    A, B with the gradients taken at the perturbed point. ‖W'_i,:‖ is the row norm of the current merged weight;
    ∇W' is the full-weight gradient of the previous step, taken as the LoRA equivalent gradient s(B·g_A + g_B·A)
    (row norms saved in on_after_backward; zero before the first backward, so the first step's ε follows ‖W'‖ only).
    ε is drawn from a generator seeded by (run seed, step): reproducible, and resumable from state_dict().

    Chang et al., "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation
    Optimization", arXiv 2502.14538 (v1); no public code (llm172/LoRA-GGPO is not available); follows the paper as
    far as it could be read here. The paper's method section itself was not readable in this environment: the
    formula above, σ²/n and β inside the variance, is Flat-LoRA's row-wise covariance σ²/n·diag(‖W'_i,:‖²)
    (Li et al., arXiv 2409.14396) extended by the gradient term, as a review of the paper (which shows
    Σ = σ²/n·diag(‖W'_1,:‖², ...)) and a third-party code that cites the paper's Eq. 6-8 give it; it is a
    reconstruction to check against the paper. kohya-ss/sd-scripts instead uses the standard deviation
    (σ‖W'_i‖ + β‖∇_i‖²)/√m.
    Where the paper is silent or unread:
    - the gradient norm is that of the previous step (the paper claims no extra gradient computation, so the
      current step's gradient is not available before its forward) and of the LoRA equivalent gradient, the part of
      the full gradient the adapter sees (the full ∂L/∂W0 would need an m×n gradient per layer);
    - the paper's v2 (LoRA-MGPO, momentum-guided perturbations) is not implemented.

    Args:
        sigma: σ, the perturbation strength (0 gives plain LoRA, step for step). Default 0.03 and β = 0.01: the
            values third-party implementations take from the paper's LLM runs (unverified).
        beta: β, the weight of the squared gradient norm against the squared weight norm.
        (the rest as LoRA)
    """

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        sigma: float = 0.03,
        beta: float = 0.01,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout)
        if sigma < 0 or beta < 0:
            raise ValueError(f"LoRA-GGPO needs sigma >= 0 and beta >= 0, got {sigma}, {beta}")
        self.sigma, self.beta = float(sigma), float(beta)
        self.seed = 0
        self._grad_sq: dict[str, torch.Tensor] = {}  # layer → ‖∇W'_i,:‖² of the last backward, (m,)
        self._clean: dict[str, torch.Tensor] = {}  # layer → W0 while ε is added to it

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self.seed = ctx.seed
        return super().wrap(model, ctx)

    # ------------------------------------------------------------------------------------ perturbation
    @torch.no_grad()
    def perturbation_std(self, name: str, layer: LoraLayer) -> torch.Tensor:
        """The standard deviation of ε in each row of `layer`: σ/√n · (‖W'_i,:‖² + β‖∇W'_i,:‖²)^½, shape (m,)."""
        w0 = layer.get_base_layer().weight  # (m, n)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, n), (m, r)
        merged = w0.float() + layer.scaling["default"] * (b.float() @ a.float())  # (m, n)
        weight_sq = merged.pow(2).sum(dim=1)  # (m,)
        grad_sq = self._grad_sq.get(name)
        grad_sq = torch.zeros_like(weight_sq) if grad_sq is None else grad_sq.to(weight_sq.device)  # (m,)
        return self.sigma / math.sqrt(w0.shape[1]) * (weight_sq + self.beta * grad_sq).sqrt()  # (m,)

    @torch.no_grad()
    def on_step_begin(self, model: nn.Module, step: int) -> None:
        if self._clean:
            raise RuntimeError("LoRA-GGPO: the previous step's perturbation was never removed (on_after_backward)")
        generators: dict[torch.device, torch.Generator] = {}
        for name, layer in sorted(self.lora_layers(model).items()):
            w0 = layer.get_base_layer().weight  # (m, n)
            if w0.device not in generators:
                generators[w0.device] = torch.Generator(device=w0.device).manual_seed(self.seed * 1_000_003 + step)
            std = self.perturbation_std(name, layer)  # (m,)
            noise = torch.randn(w0.shape, generator=generators[w0.device], device=w0.device)  # (m, n)
            self._clean[name] = w0.detach().clone()
            w0.add_((noise * std[:, None]).to(w0.dtype))

    @torch.no_grad()
    def on_after_backward(self, model: nn.Module, step: int) -> None:
        for name, layer in self.lora_layers(model).items():
            if name in self._clean:
                layer.get_base_layer().weight.copy_(self._clean.pop(name))  # exact: the saved W0, not W0 + ε − ε
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, n), (m, r)
            if a.grad is None or b.grad is None:
                continue
            grad = layer.scaling["default"] * (b.float() @ a.grad.float() + b.grad.float() @ a.float())  # (m, n)
            self._grad_sq[name] = grad.pow(2).sum(dim=1)  # (m,)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq_norms": {name: g.detach().to("cpu") for name, g in self._grad_sq.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"grad_sq_norms"}
        if unknown:
            raise ValueError(f"LoRA-GGPO state has unknown keys {sorted(unknown)}")
        self._grad_sq = {name: g.clone() for name, g in state.get("grad_sq_norms", {}).items()}
