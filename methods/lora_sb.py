"""LoRA-SB: LoRA-XS (a trainable r×r core between frozen B and A) initialised from an approximation of the first
full fine-tuning update, so that every later step of R is the best rank-r simulation of full fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, LossFn, WrapContext
from methods.lora_ga import estimate_gradients
from methods.swap import AdaptedLinear, SwapMethod


def _rank(r: int, base: nn.Linear) -> int:
    """The rank a layer gets: r capped at min(m, n) (a rank-r SVD of an m×n matrix has at most min(m, n) terms)."""
    return min(int(r), base.in_features, base.out_features)


class LoRASBLinear(AdaptedLinear):
    """W' = W0 + s·B·R·A with B (m×r) and A (r×n) frozen buffers and R (r×r) trainable.

    Before calibrate() B, A and R are zero, so the layer is the base (the gradient estimate sees an adapter that
    contributes 0); `init_from_update` then sets B = U_r, R = diag(S_r), A = V_rᵀ from the SVD of the update Ĝ.
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float) -> None:
        super().__init__(base)
        self.r, self.scaling = int(r), float(scaling)
        w = base.weight
        self.register_buffer("B", torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (m, r)
        self.register_buffer("A", torch.zeros(self.r, self.in_features, device=w.device, dtype=w.dtype))  # (r, n)
        self.R = nn.Parameter(torch.zeros(self.r, self.r, device=w.device, dtype=w.dtype))  # (r, r) the only trainable tensor

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.R @ self.A)  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(F.linear(x, self.A), self.R)  # (..., r): R·A·x
        return self.base(x) + self.scaling * F.linear(z, self.B)  # (..., m)

    @torch.no_grad()
    def init_from_update(self, update: torch.Tensor) -> None:
        """B = U_r, R = diag(S_r), A = V_rᵀ from the exact SVD (float64) of `update` (m×n), divided by s so that
        s·B·R·A is its best rank-r approximation."""
        u, sigma, vh = torch.linalg.svd(update.to("cpu", torch.float64), full_matrices=False)  # (m, p), (p,), (p, n)
        r = self.r
        self.B.copy_(u[:, :r])  # (m, r)
        self.A.copy_(vh[:r])  # (r, n)
        self.R.copy_(torch.diag(sigma[:r]) / self.scaling)  # (r, r)


class LoRASB(SwapMethod):
    """LoRA-SB: y = W0·x + s·B·R·A·x with only R (r×r) trainable; B = U_r, R = S_r, A = V_rᵀ from the SVD of
    Ĝ = −η_eff·sign(Σ_i ∇_W L_i), the first update of full fine-tuning with Adam; s = 1, W0 unchanged.

    Ponkshe, Singhal et al., "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
    Low-Rank Fine-Tuning", arXiv 2411.19557; reference RaghavSinghal10/lora-sb @
    37b33d4c4c573de20f314bc1231b84ee49771759 (utils/gradient_utils.py `estimate_and_process_grads_torch`,
    utils/initialization_utils.py `find_and_initialize_grad`, utils/latent_utils.py, train_arithmetic.py).

    Calibration sums the gradient G of every target W over `grad_samples` training examples (the adapter contributes
    0 then) and forms Ĝ = −η_eff·sign(ΣG): the first Adam step is ≈ −lr_1·sign(g), and the reference takes the
    first step's learning rate of the linear warmup as η_eff = lr / (warmup_ratio · total_steps). Then, with the
    rank-r SVD Ĝ ≈ U_r·S_r·V_rᵀ, B = U_r and A = V_rᵀ are frozen and R = S_r is trained. W0 is NOT changed, so the
    model does not start at the base: its initial ΔW = s·B·R·A is the best rank-r approximation of Ĝ, i.e. the
    model starts where one (approximated) full fine-tuning step would take it (`init_equals_base = False`).
    ∂L/∂R = s·Bᵀ·G·Aᵀ, so one step of R moves W along s²·U_rU_rᵀ·G·V_rV_rᵀ, the projection of G onto the subspaces
    of the initial update. s = α/r with α = r (the reference sets lora_alpha = lora_r): s = 1.

    Where this follows the reference differently:
    - exact SVD in float64 (the reference: torch.svd_lowrank with 10 power iterations, cast to bf16);
    - the gradient sum weights every example equally (the reference divides each batch's mean loss by the batch
      size again; for equal batch sizes the sign, hence Ĝ, is the same);
    - r is capped at min(m, n) per layer, and η_eff uses the harness's warmup length ⌈warmup_ratio·total_steps⌉
      (at least 1: with no warmup the first step takes the full lr).
    B and A are non-persistent buffers rebuilt by calibrate(); they are also in method.state_dict(), so a saved R
    reloads onto exactly the basis it was trained in even if a re-calibration differs (GPU reductions are not
    deterministic and sign() of near-zero gradient entries may flip).

    Args:
        lr: learning rate of R (the reference's arithmetic setting; its GLUE script sweeps 1e-4 … 5e-3).
        target_modules: module-name suffixes to adapt.
        r: rank (the reference: 96 for arithmetic/commonsense with Mistral-7B / Gemma; 24 on GLUE).
        grad_samples: training examples the gradient is summed over (the reference: 50; its GLUE script uses 2).
        warmup_ratio: the training run's warmup fraction, for η_eff (the YAML interpolates train.warmup_ratio).
        total_steps: the training run's optimizer steps, for η_eff (the YAML interpolates train.max_steps).
    """

    family = "adapter initialisation"

    init_equals_base = False
    #: s = α/r with α = r (the reference), fixed
    scaling = 1.0

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 96,
        grad_samples: int = 50,
        warmup_ratio: float = 0.02,
        total_steps: int = 1000,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"LoRA-SB rank r must be >= 1, got {r}")
        if grad_samples < 1:
            raise ValueError(f"grad_samples must be >= 1, got {grad_samples}")
        if not 0.0 <= warmup_ratio <= 1.0 or total_steps < 1:
            raise ValueError(f"need 0 <= warmup_ratio <= 1 and total_steps >= 1, got {warmup_ratio}, {total_steps}")
        self.r, self.grad_samples = int(r), int(grad_samples)
        self.warmup_ratio, self.total_steps = float(warmup_ratio), int(total_steps)
        self._layers: dict[str, LoRASBLinear] = {}

    @property
    def warmup_steps(self) -> int:
        """The harness's warmup length (bench/train.py), at least one step."""
        return max(1, math.ceil(self.warmup_ratio * self.total_steps))

    @property
    def eta_eff(self) -> float:
        """η_eff = lr / warmup_steps: the learning rate of the first step of the linear warmup."""
        return self.lr / self.warmup_steps

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        return LoRASBLinear(base, _rank(self.r, base), self.scaling)

    def layer_trainable(self, base: nn.Linear) -> int:
        return _rank(self.r, base) ** 2  # R (r×r)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self.seed = ctx.seed
        model = super().wrap(model, ctx)
        self._layers = self.adapted_layers(model)  # type: ignore[assignment]
        return model

    def update_approximation(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ĝ = −η_eff·sign(G) per layer (sign(ΣG) = sign of the mean gradient)."""
        return {name: -self.eta_eff * torch.sign(g) for name, g in grads.items()}

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        layers = self.adapted_layers(model)
        weights = {name: layer.base.weight for name, layer in layers.items()}
        with torch.random.fork_rng(devices=[]):  # dropout masks during the estimate: reproducible from the seed
            torch.manual_seed(self.seed)
            try:
                grads = estimate_gradients(model, weights, batches, loss_fn, self.grad_samples)
            except RuntimeError as e:
                raise RuntimeError("LoRA-SB needs calibration batches for its gradient estimate; "
                                   "set train.calibration_batches > 0") from e
        for name, update in self.update_approximation(grads).items():
            layers[name].init_from_update(update)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The frozen bases B and A of every layer (calibration output, not trainable, so not in the adapter)."""
        out: dict[str, Any] = {}
        for name, layer in self._layers.items():
            out[f"{name}.B"] = layer.B.detach().to("cpu").clone()
            out[f"{name}.A"] = layer.A.detach().to("cpu").clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {f"{n}.{k}" for n in self._layers for k in ("B", "A")}
        if set(state) != expected:
            raise KeyError(f"LoRA-SB state does not fit the model: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]}")
        with torch.no_grad():
            for name, layer in self._layers.items():
                layer.B.copy_(state[f"{name}.B"].to(layer.B.device, layer.B.dtype))
                layer.A.copy_(state[f"{name}.A"].to(layer.A.device, layer.A.dtype))
