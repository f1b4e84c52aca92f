"""LaMDA: LoRA with a frozen first projection A, a trainable r×r core S and a second projection B whose columns are
frozen one after another during training."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod


class LaMDALinear(AdaptedLinear):
    """y = W0·x + s·B·S·(A·x), s = α/r; A (r×n) frozen, S (r×r) and B (m×r) trainable, B = 0 at init.

    A is either the top-r right singular vectors of W0 (`a_init="svd"`: A = V_rᵀ, orthonormal rows) or LoRA's
    kaiming-uniform(a=√5) draw (`a_init="lora"`). S is drawn as nn.Linear(r, r)'s weight, kaiming-uniform(a=√5).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, a_init: str, dropout: float,
                 generator: torch.Generator) -> None:
        super().__init__(base)
        self.r, self.scaling = int(r), float(alpha) / int(r)
        w = base.weight
        if a_init == "svd":
            _, _, vh = torch.linalg.svd(w.detach().to("cpu", torch.float64), full_matrices=False)  # (p, n)
            a = vh[: self.r].float()  # (r, n): top-r right singular vectors of W0
        else:
            a = torch.empty(self.r, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # U(±1/√n), LoRA's A
        s = torch.empty(self.r, self.r)
        nn.init.kaiming_uniform_(s, a=math.sqrt(5), generator=generator)  # nn.Linear(r, r)'s init, U(±1/√r)
        self.A = nn.Parameter(a.to(w.device, w.dtype), requires_grad=False)  # (r, n) frozen
        self.S = nn.Parameter(s.to(w.device, w.dtype))  # (r, r)
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (m, r) zero
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.S @ self.A)  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(F.linear(self.dropout(x), self.A), self.S)  # (..., r): S·A·x
        return self.base(x) + self.scaling * F.linear(z, self.B)  # (..., m)


class LaMDA(SwapMethod):
    """LaMDA: y = W0·x + s·B·S·A·x with A frozen, S (r×r) trained, and B trained but frozen column by column: at
    optimizer step t (0-based) of T, the first k(t) = ⌊(t+1)/(η·T)⌋ columns of B take no update (all of B when
    k(t) ≥ r).

    Azizi, Kundu, Pedram, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation",
    EMNLP 2024 Findings, arXiv 2406.12832; reference ArminAzizi98/LaMDA @ 8ad34b46e15496be1279afebb80206cd91163933
    (lamda.py `get_lamda_model`, `forward_adapter`; custom_trainer.py `gradual_freeze_B`, η = 0.3;
    scripts/train_gsm8k.sh: r = 64, α = 16).

    The schedule is the reference's: after every backward, B.grad[:, :k] is zeroed with k =
    ⌊micro-batches seen/(η·T·accumulation)⌋, T the run's optimizer steps; at the last micro-batch of step t that is
    ⌊(t+1)/(η·T)⌋, so the first column freezes at step ⌈ηT⌉ − 1 and, with η = 0.3, at most ⌊1/η⌋ = 3 columns are
    frozen by the end of a run (the reference sets B.requires_grad = False once k ≥ r). The paper's Figure 1 describes
    B as fully frozen after an early phase; the reference schedule is the one implemented.

    Freezing (`freeze`):
    - "exact" (default): the columns' gradients are zeroed and the columns are restored after the optimizer step, so
      a frozen column never changes (the paper's "freeze"): Adam's momentum and decoupled weight decay would
      otherwise keep moving it.
    - "grad_mask": only the gradient is zeroed (the reference); AdamW's momentum and weight decay still move the
      column.

    A: the paper initialises the projections from the SVD of W0 (`a_init: svd`, the default: A = V_rᵀ, the top-r
    right singular vectors); the reference keeps PEFT's default LoRA A (`a_init: lora`). S: kaiming-uniform as the
    reference's nn.Linear(r, r) (kept in the model dtype here, bf16 there); B = 0, so the model starts at the base.
    LaMDA++ (rank allocation from the normalised spectrum of W0) is not implemented.

    Args:
        lr: learning rate (AdamW) of S, B and the heads.
        target_modules: module-name suffixes to adapt.
        r: rank (S is r×r), capped at min(m, n) per layer.
        alpha: scaling numerator; s = alpha / r.
        dropout: dropout on the adapter input (the reference's lora_dropout).
        a_init: "svd" (the paper) or "lora" (the reference).
        freeze_eta: η; a new column of B freezes every η·T steps.
        freeze: "exact" or "grad_mask" (see above).
        total_steps: T; None takes the run's train.max_steps from the WrapContext.
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"), r: int = 64,
                 alpha: float = 16.0, dropout: float = 0.0, a_init: str = "svd", freeze_eta: float = 0.3,
                 freeze: str = "exact", total_steps: int | None = None) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if int(r) < 1:
            raise ValueError(f"method.r must be >= 1, got {r}")
        if a_init not in ("svd", "lora"):
            raise ValueError(f"method.a_init must be 'svd' (the paper) or 'lora' (the reference), got {a_init!r}")
        if freeze not in ("exact", "grad_mask"):
            raise ValueError(f"method.freeze must be 'exact' or 'grad_mask', got {freeze!r}")
        if not freeze_eta > 0:
            raise ValueError(f"method.freeze_eta must be > 0, got {freeze_eta}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"method.dropout must be in [0, 1), got {dropout}")
        if total_steps is not None and int(total_steps) < 1:
            raise ValueError(f"method.total_steps must be >= 1 or null, got {total_steps}")
        self.r, self.alpha, self.dropout, self.a_init = int(r), float(alpha), float(dropout), a_init
        self.freeze_eta, self.freeze = float(freeze_eta), freeze
        self.total_steps = int(total_steps) if total_steps is not None else None
        self._frozen: dict[str, torch.Tensor] = {}  # layer -> B[:, :k] before the step ("exact")

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        if self.total_steps is None:
            if ctx.max_steps is None:
                raise ValueError("LaMDA's freezing schedule needs the run's length: set method.total_steps")
            self.total_steps = int(ctx.max_steps)
        return super().wrap(model, ctx)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "lamda", name))
        return LaMDALinear(base, self.layer_rank(base), self.alpha, self.a_init, self.dropout, generator)

    def layer_rank(self, base: nn.Linear) -> int:
        """r capped at min(m, n) (a rank-r SVD of an m×n matrix has at most min(m, n) terms)."""
        return min(self.r, base.in_features, base.out_features)

    def layer_trainable(self, base: nn.Linear) -> int:
        r = self.layer_rank(base)
        return r * r + base.out_features * r  # S (r×r) + B (m×r); A is frozen

    def frozen_columns(self, step: int) -> int:
        """k(t) = ⌊(t+1)/(η·T)⌋: the leading columns of B that take no update at step t (all of B once k(t) ≥ r)."""
        assert self.total_steps is not None, "wrap() first"
        return int((step + 1) / (self.freeze_eta * self.total_steps))

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        k = self.frozen_columns(step)
        self._frozen = {}
        if k == 0:
            return
        for name, layer in self.adapted_layers(model).items():
            if layer.B.grad is not None:
                layer.B.grad[:, :k] = 0.0
            if self.freeze == "exact":
                self._frozen[name] = layer.B.detach()[:, :k].clone()  # (m, k)

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if self._frozen:
            layers = self.adapted_layers(model)
            with torch.no_grad():
                for name, cols in self._frozen.items():
                    layers[name].B[:, : cols.shape[1]] = cols
            self._frozen = {}
        return False
