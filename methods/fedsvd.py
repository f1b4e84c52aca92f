"""FedSVD, centralised: LoRA with only B trained, whose product B·A is periodically re-factored by an SVD so that A
becomes the orthonormal top right singular vectors of the update learned so far."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod


class FedSVDLinear(AdaptedLinear):
    """y = W0·x + s·B·(A·x), s = α/r; A (r×n) frozen (no gradient), B (m×r) trainable, B = 0 at init.

    A starts as LoRA's kaiming-uniform(a=√5) draw (PEFT's default, the reference's); `refactor_()` replaces (B, A)
    with (U_r·Σ_r, V_rᵀ) from the SVD of B·A, leaving B·A unchanged.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__(base)
        self.r, self.scaling = int(r), float(alpha) / int(r)
        w = base.weight
        a = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # U(±1/√n)
        self.A = nn.Parameter(a.to(w.device, w.dtype), requires_grad=False)  # (r, n) frozen between re-factorings
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (m, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), self.A), self.B)  # (..., m)

    @torch.no_grad()
    def refactor_(self) -> None:
        """B·A = U·Σ·Vᵀ (rank ≤ r); A ← V_rᵀ (orthonormal rows), B ← U_r·Σ_r. Computed in float64 from the thin
        factors: B = Q·R (QR, m×r and r×r), R·A = U'·Σ·Vᵀ (r×n), so B·A = (Q·U')·Σ·Vᵀ with Q·U' orthonormal,
        which is the SVD of B·A without forming the m×n product. When rank(B·A) < r (B = 0 at the first
        re-factoring of a layer that got no gradient) the extra rows of A are still orthonormal and their columns of
        B are zero."""
        b, a = self.B.double(), self.A.double()  # (m, r), (r, n)
        q, rr = torch.linalg.qr(b)  # (m, r), (r, r)
        u, sigma, vh = torch.linalg.svd(rr @ a, full_matrices=False)  # (r, r), (r,), (r, n)
        self.B.copy_((q @ u) * sigma)  # (m, r): U_r·Σ_r
        self.A.copy_(vh)  # (r, n): V_rᵀ


class FedSVD(SwapMethod):
    """FedSVD (centralised): LoRA y = W0·x + s·B·A·x with A frozen and only B (and the task head) trained; every
    `refactor_every` optimizer steps, each layer's B·A = U·Σ·Vᵀ is re-factored as A ← V_rᵀ, B ← U_r·Σ_r and the
    Adam state of B is reset.

    Lee, Park et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025,
    arXiv 2505.12805; reference sw-programmer/FedSVD @ 6f08befd059ec8eb01fdb917c6641e3206eda6c4 (misc/utils.py
    `reinit_lora`, `freeze_target_layers`, `get_lora_config`; fedmm/fedavg/server.py `on_round_complete`;
    fedmm/fedavg/client.py; readme.md: r = 8, α = 8, 10 local iterations per round, re-SVD every round).

    In the paper a round is: clients train B for a few local steps (A frozen, as FFA-LoRA), the server averages the
    B's, forms B·A with the previous A, and re-factors it by SVD; A's rows are then orthonormal, which bounds B's
    gradient norm under DP-SGD. Here there is one client, no privacy noise and no averaging: a "round" is
    `refactor_every` optimizer steps (the reference's 10 local iterations), after which B·A is re-factored. s·B·A, and
    so the model, is unchanged by a re-factoring; only the parameterisation the next steps see changes.

    The optimizer state: the reference's clients build a new optimizer every round. Here on_step_end clears
    optimizer.state[B] of every layer right after the re-factoring (so the next step of B starts Adam afresh: step 1,
    zero moments) and returns False: the trainable set is unchanged, so no optimizer rebuild is needed; the head's
    state and the learning-rate schedule carry on (the reference's classifier is frozen and its scheduler restarts
    each round, constant in its scripts).

    A changes at each re-factoring but is not a trainable tensor, so the adapter state (what checkpoints and
    adapter.safetensors keep) holds every layer's A beside the trainable tensors.

    Args:
        lr: learning rate (AdamW) of B and the heads.
        target_modules: module-name suffixes to adapt.
        r: rank of B·A, capped at min(m, n) per layer.
        alpha: scaling numerator; s = alpha / r.
        dropout: dropout on the adapter input.
        refactor_every: optimizer steps between two re-factorings (a federated round).
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"), r: int = 8,
                 alpha: float = 8.0, dropout: float = 0.0, refactor_every: int = 10) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if int(r) < 1:
            raise ValueError(f"method.r must be >= 1, got {r}")
        if int(refactor_every) < 1:
            raise ValueError(f"method.refactor_every must be >= 1, got {refactor_every}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"method.dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.refactor_every = int(refactor_every)

    def layer_rank(self, base: nn.Linear) -> int:
        return min(self.r, base.in_features, base.out_features)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "fedsvd", name))
        return FedSVDLinear(base, self.layer_rank(base), self.alpha, self.dropout, generator)

    def layer_trainable(self, base: nn.Linear) -> int:
        return base.out_features * self.layer_rank(base)  # B (m×r); A is frozen

    def refactor(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-factor every layer and drop the optimizer state of its B."""
        for layer in self.adapted_layers(model).values():
            layer.refactor_()  # type: ignore[operator]
            if optimizer is not None:
                optimizer.state.pop(layer.B, None)

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if (step + 1) % self.refactor_every == 0:
            self.refactor(model, optimizer)
        return False

    # ------------------------------------------------------------------------------------- state
    def saved_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable tensors plus every layer's A (re-factored during training: not reproducible from the seed)."""
        saved = dict(self.trainable_parameters(model))
        saved.update({f"{name}.A": layer.A for name, layer in self.adapted_layers(model).items()})
        return saved
