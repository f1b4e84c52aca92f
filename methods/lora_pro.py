"""LoRA-Pro: LoRA whose optimizer steps the low-rank factors so that s·B·A moves like full fine-tuning with Adam."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from methods.galore import adamw_step_
from methods.lora import LoRA


# ============================================================================================ helpers
def solve_sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with P·X + X·Q = C for symmetric positive semi-definite P (r×r) and Q (k×k), in float64.

    With P = U·diag(λ)·Uᵀ and Q = V·diag(μ)·Vᵀ: X = U·[(Uᵀ·C·V)_ij / (λ_i + μ_j)]·Vᵀ. Where λ_i + μ_j = 0 (both
    factors singular along a direction) the equation leaves that entry free and it is set to 0.
    """
    lam, u = torch.linalg.eigh(p.double())  # (r,), (r, r)
    mu, v = torch.linalg.eigh(q.double())  # (k,), (k, k)
    denom = lam[:, None] + mu[None, :]  # (r, k)
    rhs = u.T @ c.double() @ v  # (r, k)
    tiny = torch.finfo(torch.float64).tiny
    y = torch.where(denom.abs() > tiny, rhs / torch.where(denom.abs() > tiny, denom, 1.0), 0.0)  # (r, k)
    return u @ y @ v.T  # (r, k)


def adjusted_gradients(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scaling: float,
                       first_step: bool = False, delta: float = 1e-8,
                       balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's replacement of the LoRA gradients (g_A, g_B) of A (r×n) and B (m×r).

        g̃_A = s⁻²(BᵀB)⁻¹·g_A + X·A
        g̃_B = s⁻²·[I − B(BᵀB)⁻¹Bᵀ]·g_B·(AAᵀ)⁻¹ − B·X
        X solves BᵀB·X + X·AAᵀ = −s⁻²(BᵀB)⁻¹·g_A·Aᵀ

    with (·)⁻¹ = pinv(· + δI). Then s(B·g̃_A + g̃_B·A) is the Frobenius projection of the full gradient G onto the
    tangent space {B·X + Y·A} (g_A = s·BᵀG, g_B = s·G·Aᵀ); X does not change that product and picks, among the pairs
    that give it, the one closest to (g_A, g_B). `first_step` adjusts only g_B (g̃_A = g_A, g̃_B = s⁻²·g_B·(AAᵀ)⁻¹),
    as the reference does when B = 0 makes (BᵀB)⁻¹ meaningless. `balance=False` leaves X out (X = 0).
    The r×r inverses and the Sylvester solve run in float64; the m×n products in the gradients' dtype.
    """
    dtype = grad_a.dtype
    r = a.shape[0]
    eye = torch.eye(r, dtype=torch.float64, device=a.device)
    aat = (a.double() @ a.double().T)  # (r, r)
    aat_inv = torch.linalg.pinv(aat + delta * eye).to(dtype)  # (r, r)
    if first_step:
        return grad_a, grad_b @ aat_inv / scaling**2
    btb = (b.double().T @ b.double())  # (r, r)
    btb_inv = torch.linalg.pinv(btb + delta * eye).to(dtype)  # (r, r)
    ga = btb_inv @ grad_a / scaling**2  # (r, n)
    gb = (grad_b - b @ (btb_inv @ (b.T @ grad_b))) @ aat_inv / scaling**2  # (m, r): [I − B(BᵀB)⁻¹Bᵀ]·g_B·(AAᵀ)⁻¹
    if not balance:
        return ga, gb
    x = solve_sylvester(btb, aat, -(ga.double() @ a.double().T)).to(dtype)  # (r, r)
    return ga + x @ a, gb - b @ x


def equivalent_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """s·(B·g_A + g_B·A) (m×n): the full-weight gradient an SGD step on (A, B) applies to s·B·A, to first order."""
    return scaling * (b @ grad_a + grad_b @ a)


# ========================================================================================== optimizer
class LoRAProAdam(torch.optim.Optimizer):
    """LoRA-Pro's optimizer: Adam on the equivalent full gradient of each LoRA pair, mapped back to (A, B).

    A group with `lora_pro=True` holds one pair [A, B] and its `scaling` s. Per step, for each pair:

        g̃ = s(B·g̃_A + g̃_B·A)                    equivalent gradient of the adjusted raw gradients (m×n)
        M ← β1·M + (1−β1)·g̃,  V ← β2·V + (1−β2)·g̃²,  G* = M̂ / (√V̂ + ε)   Adam on the m×n gradient
        (ĝ_A, ĝ_B) = adjusted_gradients(A, B, s·Bᵀ·G*, s·G*·Aᵀ)    with X (the balanced split)
        A ← A − lr·ĝ_A,  B ← B − lr·ĝ_B                                an SGD step

    The other groups (task heads) are stepped with plain AdamW. All state lives in self.state[p]: for a pair, in the
    state of A ("step", "exp_avg", "exp_avg_sq", the last two m×n); for the others, AdamW's.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 1e-8) -> None:
        if not lr > 0 or not eps > 0 or not delta > 0:
            raise ValueError(f"need lr, eps, delta > 0; got {lr}, {eps}, {delta}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                        lora_pro=False, scaling=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["lora_pro"] and len(group["params"]) != 2:
                raise ValueError("a lora_pro group holds exactly one pair [A, B]")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["lora_pro"]:
                self._pair_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _pair_step(self, group: dict[str, Any]) -> None:
        a, b = group["params"]  # (r, n), (m, r)
        if a.grad is None and b.grad is None:
            return
        grad_a = a.grad if a.grad is not None else torch.zeros_like(a)  # (r, n)
        grad_b = b.grad if b.grad is not None else torch.zeros_like(b)  # (m, r)
        s, lr, eps, delta, wd = group["scaling"], group["lr"], group["eps"], group["delta"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        state = self.state[a]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(b.shape[0], a.shape[1], dtype=a.dtype, device=a.device)  # (m, n)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])  # (m, n)
        first = state["step"] == 0
        # Adam on the equivalent full gradient (X cancels in it, so the raw adjustment skips the Sylvester solve)
        ga, gb = adjusted_gradients(a, b, grad_a, grad_b, s, first_step=first, delta=delta, balance=False)
        g_full = equivalent_gradient(a, b, ga, gb, s)  # (m, n)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g_full, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_full, g_full, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)  # (m, n)
        direction = exp_avg / (1 - beta1**t) / denom  # (m, n): Adam's full-weight step direction
        # back to the factors: the LoRA gradients of `direction`, adjusted again (with X)
        ga, gb = adjusted_gradients(a, b, s * (b.T @ direction), s * (direction @ a.T), s,
                                    first_step=first, delta=delta)  # (r, n), (m, r)
        if wd:
            a.mul_(1 - lr * wd)
            b.mul_(1 - lr * wd)
        a.add_(ga, alpha=-lr)
        b.add_(gb, alpha=-lr)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is not None:
                adamw_step_(p, self.state[p], group["lr"], group["weight_decay"], group["betas"], group["eps"])


# ============================================================================================= method
class LoRAPro(LoRA):
    """LoRA-Pro: y = W0·x + s·B·A·x, trained so that s·B·A follows full fine-tuning's Adam step projected onto the
    LoRA tangent space. Per step and layer (LoRAProAdam):

        g̃_A = s⁻²(BᵀB)⁻¹·g_A + X·A,   g̃_B = s⁻²·[I − B(BᵀB)⁻¹Bᵀ]·g_B·(AAᵀ)⁻¹ − B·X,
        X solves BᵀB·X + X·AAᵀ = −s⁻²(BᵀB)⁻¹·g_A·Aᵀ,   (·)⁻¹ = pinv(· + δI), δ = 1e-8;
        at the first step only g_B is adjusted (g̃_A = g_A, g̃_B = s⁻²·g_B·(AAᵀ)⁻¹).
        Adam moments M, V (m×n) are kept on g̃ = s(B·g̃_A + g̃_B·A), the projection of the full gradient G onto
        {B·X + Y·A}; Adam's direction G* = M̂/(√V̂ + ε) is mapped back through (s·BᵀG*, s·G*·Aᵀ) and the same
        adjustment (with X), and (A, B) take an SGD step of size lr along the result.

    Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", arXiv 2407.18242; reference mrflogs/LoRA-Pro
    @ fe2602725b21f6b1c689462d73553f3e50b3d565 (DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py,
    `lorapro_full_adjustment`, run with the Trainer's optim="sgd").

    Differences from the reference:
    - Step count: the reference increments its step counter before the adjustment, so its "step 0" branch (only g_B
      adjusted) never runs and its first Adam bias correction uses t = 2. Here t = 1, 2, ... as in Adam and the
      paper's algorithm, and the first step takes the g_B-only branch, as the spec says. With B0 = 0 both branches
      give the same step (g_A = 0), so only the t offset changes the dynamics: for a steady gradient the
      reference's first steps are ≈ 0.74×, 0.86×, 0.91×, ... the size of these.
    - Precision: the reference keeps the m×n moments in bf16 (its V update casts g̃ to bf16); here they are kept in
      the parameters' dtype (fp32) and the r×r inverses and the Sylvester solve run in float64. The Sylvester
      equation is solved through the eigendecompositions of the symmetric BᵀB and AAᵀ (the reference: a general
      complex eig); the solution is the same.
    - Clipping: DeepSpeed clips the final adjusted gradients by the norm of the raw ones; here the loop clips the raw
      gradients before optimizer.step(), so clipping acts on what enters the Adam moments.
    - The reference hard-codes s = 16/8 and assumes every trainable tensor belongs to an (A, B) pair; here each
      layer's own s is used (α/r, or α/√r with rsLoRA) and the task heads are trained with plain AdamW (same lr,
      betas, eps) inside the same optimizer.
    - Weight decay (the reference: 0) is applied to A and B as SGD's, p ← p·(1 − lr·wd), before the step.

    Args:
        delta: δ of pinv(· + δI).
        (the rest as LoRA; init is LoRA's default, B = 0, and DoRA is not supported)
    """

    family = "optimizer"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        delta: float = 1e-8,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout,
                         use_rslora=use_rslora)
        if not delta > 0:
            raise ValueError(f"LoRA-Pro delta must be > 0, got {delta}")
        self.delta = float(delta)

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        pairs: list[dict[str, Any]] = []
        for _, layer in sorted(self.lora_layers(model).items()):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, n), (m, r)
            if a.requires_grad and b.requires_grad:
                pairs.append({"params": [a, b], "lora_pro": True, "scaling": float(layer.scaling["default"]),
                              "weight_decay": weight_decay})
        if not pairs:
            raise RuntimeError("LoRA-Pro found no trainable LoRA pair in the model")
        paired = {id(p) for g in pairs for p in g["params"]}
        rest = []
        for g in self.param_groups(model, weight_decay):  # heads: AdamW groups (decay on matrices only)
            params = [p for p in g["params"] if id(p) not in paired]
            if params:
                rest.append({**g, "params": params})
        return LoRAProAdam(pairs + rest, lr=self.lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           delta=self.delta)
