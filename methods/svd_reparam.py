"""Reparameterisations of W0 through a fixed factorisation, training only a few scalars per direction.

SVFit trains singular values, SALT scales/shifts the top singular values and adds a low-rank update on the tail of
the spectrum, LoLDU trains the diagonal of an LDU (LU with pivoting) factorisation. All three factorise W0 once, at
wrap time, in float64 on the CPU, and keep the frozen factors as fp32 buffers (not parameters: never counted as
trainable, never saved, recomputed deterministically from W0 when a fresh copy of the base is wrapped).

Each paper writes the adapted weight as "frozen residual + trainable factorised part", W' = W_res + F(θ) with
W_res = W0 − F(θ0). The layers below evaluate the same W' as W0 + (F(θ) − F(θ0)): mathematically identical, but the
residual is never materialised, the initial weight is W0 bit for bit, and under bf16 autocast only the (small)
update is rounded, not a reconstruction of W0.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, WrapContext
from methods.swap import AdaptedLinear, SwapMethod


def _svd64(base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of W0 (m×n) in float64 on the CPU: U (m, p), σ (p,) descending, V (n, p), p = min(m, n)."""
    w = base.weight.detach().to("cpu", torch.float64)  # (m, n)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)  # (m, p), (p,), (p, n)
    return u, sigma, vh.mT


def _buffer(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A frozen factor as an fp32 buffer on the device of the base weight."""
    return t.to(like.device, torch.float32).contiguous()


def _rank(r: int | None, base: nn.Linear) -> int:
    """The number of directions a layer keeps: r capped at min(m, n); None means all min(m, n)."""
    p = min(base.in_features, base.out_features)
    return p if r is None else min(int(r), p)


def _check_rank(r: int | None) -> None:
    if r is not None and int(r) < 1:
        raise ValueError(f"r must be >= 1 or null (all directions), got {r}")


# ============================================================================================== SVFit
class SVFitLinear(AdaptedLinear):
    """W' = W_e + U_r·diag(σ)·V_rᵀ with W_e = W0 − U_r·diag(σ0)·V_rᵀ, evaluated as W0 + U_r·diag(σ − σ0)·V_rᵀ."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__(base)
        u, sigma, v = _svd64(base)
        self.register_buffer("u", _buffer(u[:, :r], base.weight), persistent=False)  # (m, r)
        self.register_buffer("v", _buffer(v[:, :r], base.weight), persistent=False)  # (n, r)
        self.register_buffer("sigma0", _buffer(sigma[:r], base.weight), persistent=False)  # (r,)
        self.sigma = nn.Parameter(self.sigma0.clone())  # (r,) the only trainable tensor

    def delta(self) -> torch.Tensor:
        return ((self.u * (self.sigma - self.sigma0)) @ self.v.mT).to(self.base.weight.dtype)  # (m, n)

    def residual(self) -> torch.Tensor:
        """The frozen W_e = W0 − U_r·diag(σ0)·V_rᵀ of the paper (for analysis; the forward never forms it)."""
        return self.base.weight - (self.u * self.sigma0) @ self.v.mT  # (m, n)


class SVFit(SwapMethod):
    """SVFit: W' = W_e + U_r·Σ_r·V_rᵀ, with only the r singular values Σ_r trainable (U_r, V_r, W_e frozen).

    Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
    arXiv 2409.05926. No public code (paper only). W0 = U·Σ·Vᵀ; the best rank-r approximation W_r = U_r·Σ_r·V_rᵀ keeps
    the top-r singular values, which become the trainable parameters (initialised to their values, so the model
    starts at the base), and W_e = W0 − W_r is frozen. ∂L/∂σ_i = u_iᵀ·G·v_i with G = ∂L/∂W.

    The paper picks the top-r values that hold "over 99% of the matrix's information" and reports 16× fewer
    trainable parameters than LoRA r=8, which for a square d×d layer is exactly r = d (d values against LoRA's 16·d):
    the default r = null trains every singular value; an integer r keeps the top r (capped at min(m, n)).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: singular values trained per layer (the top r); null trains all min(m, n).
    """

    family = "singular values"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int | None = None) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        _check_rank(r)
        self.r = None if r is None else int(r)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> SVFitLinear:
        return SVFitLinear(base, _rank(self.r, base))

    def layer_trainable(self, base: nn.Linear) -> int:
        return _rank(self.r, base)  # σ_1..σ_r


# =============================================================================================== SALT
class SALTLinear(AdaptedLinear):
    """W' = U·ReLU(Σ')·Vᵀ over the full thin SVD of W0, with Σ' = diag(a⊙σ_top + b) ⊕ (diag(σ_tail) + X·Y).

    Σ' is block diagonal (p×p, p = min(m, n)): the top-k block is diagonal, the tail block is diagonal plus the
    rank-r_lora product X·Y, the off-diagonal blocks are zero (ReLU(0) = 0 and no parameter reaches them). ReLU acts
    element-wise on Σ', as in the reference, so negative entries of the tail block — off-diagonal ones included —
    are clipped. Evaluated as W0 + U·(ReLU(Σ') − diag(σ))·Vᵀ, which is W' exactly since W0 = U·diag(σ)·Vᵀ.

    Unlike σ-only methods, X·Y is expressed in the basis of the tail singular vectors, which an SVD fixes only up to
    the sign of each (u_i, v_i) pair: a saved SALT adapter is meant to be reloaded with the same torch/LAPACK build.
    """

    def __init__(self, base: nn.Linear, k: int, r_lora: int, generator: torch.Generator) -> None:
        super().__init__(base)
        u, sigma, v = _svd64(base)
        p, self.k = sigma.numel(), k
        self.register_buffer("u", _buffer(u, base.weight), persistent=False)  # (m, p)
        self.register_buffer("v", _buffer(v, base.weight), persistent=False)  # (n, p)
        self.register_buffer("sigma", _buffer(sigma, base.weight), persistent=False)  # (p,)
        self.scale = nn.Parameter(torch.ones(k, device=base.weight.device))  # (k,) a
        self.shift = nn.Parameter(torch.zeros(k, device=base.weight.device))  # (k,) b
        x = torch.empty(p - k, r_lora)  # (p−k, r_lora)
        if x.numel():
            # the reference's init: kaiming-uniform with nonlinearity="relu" (its a=√20 only matters for leaky_relu),
            # i.e. U(±√(6 / r_lora)) since fan_in = r_lora for a (p−k)×r_lora tensor
            nn.init.kaiming_uniform_(x, a=math.sqrt(20), mode="fan_in", nonlinearity="relu", generator=generator)
        self.x = nn.Parameter(x.to(base.weight.device))  # (p−k, r_lora)
        self.y = nn.Parameter(torch.zeros(r_lora, p - k, device=base.weight.device))  # (r_lora, p−k)

    def top_delta(self) -> torch.Tensor:
        """(a⊙σ_top + b) − σ_top: the change of the top-k singular values (the reference's scale/shift term)."""
        top = self.sigma[: self.k]  # (k,)
        return self.scale * top + self.shift - top  # (k,)

    def tail_product(self) -> torch.Tensor:
        return self.x @ self.y  # (p−k, p−k)

    def sigma_prime(self) -> torch.Tensor:
        """Σ' (p×p), before the ReLU, as the paper writes it (used by tests; the forward uses the blocks)."""
        s = torch.diag(self.sigma).clone()  # (p, p)
        s[: self.k, : self.k] = torch.diag(self.sigma[: self.k] + self.top_delta())
        s[self.k :, self.k :] += self.tail_product()
        return s

    def delta(self) -> torch.Tensor:
        k, sigma = self.k, self.sigma
        top = F.relu(sigma[:k] + self.top_delta()) - sigma[:k]  # (k,)
        delta = (self.u[:, :k] * top) @ self.v[:, :k].mT  # (m, n)
        if self.x.numel():
            tail = F.relu(torch.diag(sigma[k:]) + self.tail_product()) - torch.diag(sigma[k:])  # (p−k, p−k)
            delta = delta + (self.u[:, k:] @ tail) @ self.v[:, k:].mT  # (m, n)
        return delta.to(self.base.weight.dtype)


class SALT(SwapMethod):
    """SALT: W' = U·ReLU(Σ')·Vᵀ, Σ' = diag(a⊙σ_{1..k} + b) ⊕ (diag(σ_{k+1..p}) + X·Y); a, b, X, Y trainable.

    Elsayed et al., "SALT: Singular Value Adaptation with Low-Rank Transformation", arXiv 2503.16055; reference
    BioMedIA-MBZUAI/SALT at 7314877a987221cbb499e836220a090c35fc60e1 (prompt_adapted_SAM2/modeling/Adapters/SALT.py,
    the version with the X kaiming / Y = 0 init). Full thin SVD W0 = U·diag(σ)·Vᵀ (p = min(m, n)), frozen. The top
    k = max(1, ⌊ρ·p⌋) singular values get a trainable scale a (init 1) and shift b (init 0); the p − k tail values
    get a rank-r_lora update X·Y (X: (p−k)×r_lora kaiming-uniform, Y: r_lora×(p−k) zeros) added to their diagonal
    block; ReLU is applied element-wise to the whole Σ'. At init Σ' = diag(σ) ≥ 0, so W' = W0.
    Per layer: 2k + 2·(p−k)·r_lora trainable parameters. The optional regulariser ‖Σ'_top − Σ_top‖_F + ‖X·Y‖_F
    (per layer, summed) has weight 0 in the reference configuration (`reg_multiplier: 0`).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        ratio: ρ, the fraction of the min(m, n) singular values that get scale and shift.
        r_lora: rank of the tail update X·Y.
        reg_weight: weight of the regulariser added to the loss (0 disables it).
    """

    family = "singular values"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 ratio: float = 0.1, r_lora: int = 4, reg_weight: float = 0.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"SALT ratio must be in [0, 1], got {ratio}")
        if r_lora < 1:
            raise ValueError(f"SALT r_lora must be >= 1, got {r_lora}")
        if reg_weight < 0:
            raise ValueError(f"SALT reg_weight must be >= 0, got {reg_weight}")
        self.ratio, self.r_lora, self.reg_weight = float(ratio), int(r_lora), float(reg_weight)

    def top_count(self, base: nn.Linear) -> int:
        """k = max(1, ⌊ρ·min(m, n)⌋), the reference's rule (it keeps at least one scaled value)."""
        p = min(base.in_features, base.out_features)
        return min(p, max(1, math.floor(self.ratio * p)))

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> SALTLinear:
        # one generator per layer, from the run's seed and the layer name: X does not depend on wrap order
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(name.encode()))
        return SALTLinear(base, self.top_count(base), self.r_lora, generator)

    def layer_trainable(self, base: nn.Linear) -> int:
        p, k = min(base.in_features, base.out_features), self.top_count(base)
        return 2 * k + 2 * (p - k) * self.r_lora  # a, b (k each) + X ((p−k)×r) + Y (r×(p−k))

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: object) -> torch.Tensor | None:
        if self.reg_weight == 0.0:
            return None
        terms = [
            torch.linalg.vector_norm(layer.top_delta()) + torch.linalg.matrix_norm(layer.tail_product())
            for layer in self.adapted_layers(model).values()
        ]
        return self.reg_weight * torch.stack(terms).sum()


# ============================================================================================== LoLDU
class LoLDULinear(AdaptedLinear):
    """W' = W_res + s·P·L_r·diag(z)·U_r with W_res = W0 − s·P·L_r·diag(z0)·U_r, evaluated as
    W0 + s·(P·L_r)·diag(z − z0)·U_r. P·L_r is stored as one buffer (a row permutation of L_r: exact)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float) -> None:
        super().__init__(base)
        w = base.weight.detach().to("cpu", torch.float64)  # (m, n)
        perm, lower, upper = torch.linalg.lu(w)  # (m, m), (m, p), (p, n): W0 = P·L·U, partial pivoting
        d = torch.diagonal(upper)  # (p,)
        if (d[:r] == 0).any():
            raise ValueError("LoLDU: W0 has a zero pivot among the kept directions (rank-deficient); lower r")
        unit_upper = upper[:r] / d[:r, None]  # (r, n) unit upper-triangular rows: W0 = P·L·diag(d)·U
        self.scaling = float(scaling)
        self.register_buffer("pl", _buffer(perm @ lower[:, :r], base.weight), persistent=False)  # (m, r)
        self.register_buffer("ur", _buffer(unit_upper, base.weight), persistent=False)  # (r, n)
        self.register_buffer("z0", _buffer(d[:r], base.weight), persistent=False)  # (r,)
        self.z = nn.Parameter(self.z0.clone())  # (r,) the only trainable tensor

    def delta(self) -> torch.Tensor:
        return (self.scaling * (self.pl * (self.z - self.z0)) @ self.ur).to(self.base.weight.dtype)  # (m, n)

    def factored(self) -> torch.Tensor:
        """s·P·L_r·diag(z)·U_r, the trainable part of W' (for analysis)."""
        return self.scaling * (self.pl * self.z) @ self.ur  # (m, n)

    def residual(self) -> torch.Tensor:
        """The frozen W_res = W0 − s·P·L_r·diag(z0)·U_r of the paper (for analysis; the forward never forms it)."""
        return self.base.weight - self.scaling * (self.pl * self.z0) @ self.ur  # (m, n)


class LoLDU(SwapMethod):
    """LoLDU: W' = W_res + s·P·L_r·diag(z)·U_r, only z (r values per layer) trainable, s = α/r.

    Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
    Fine-Tuning", arXiv 2410.13618; reference SKDDJ/LoLDU at 4fe87a05a668006f55153539cece7fffa91ed91d
    (minloldu/loldu.py). LU with partial pivoting W0 = P·L·U, D = diag(U), U ← D⁻¹·U (unit diagonal), so
    W0 = P·L·D·U. The reference keeps the first r columns of L, the first r rows of U and z = the first r entries
    of D (the elimination order, not the largest |d|), freezes W_res = W0 − s·P·L_r·diag(z0)·U_r, and trains only
    z (init "lu": z = D_r, so the model starts at the base). s = α/r is a fixed constant (the reference stores it
    as a parameter but never trains it; `from_linear` uses α = 1).

    At r = min(m, n) the factors reconstruct W0 (P·L·diag(z0)·U = W0) and W_res = (1 − s)·W0; the reference's
    default configuration uses the full rank (rank=768 on 768-wide models), hence r = null below.

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: directions kept per layer (the first r pivots); null keeps all min(m, n).
        alpha: scaling numerator, s = alpha / r (r per layer after capping at min(m, n)).
    """

    family = "singular values"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int | None = None, alpha: float = 1.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        _check_rank(r)
        if not alpha > 0:
            raise ValueError(f"LoLDU alpha must be > 0, got {alpha}")
        self.r, self.alpha = (None if r is None else int(r)), float(alpha)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> LoLDULinear:
        r = _rank(self.r, base)
        return LoLDULinear(base, r, self.alpha / r)

    def layer_trainable(self, base: nn.Linear) -> int:
        return _rank(self.r, base)  # z_1..z_r
