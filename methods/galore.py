"""GaLore: full-parameter training whose Adam state lives in a low-rank projection of each weight's gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from methods.base import WrapContext
from methods.full import Full


# ============================================================================================ helpers
def adam_moments(grad: torch.Tensor, state: dict[str, Any], betas: tuple[float, float],
                 eps: float, lr: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One Adam moment update of state["exp_avg"], state["exp_avg_sq"], state["step"] on `grad`.

    Returns (exp_avg, denom, step_size) such that the Adam step is −step_size·exp_avg/denom, with the operations of
    torch.optim.AdamW's single-tensor path in the same order (lerp, addcmul, bias-corrected √v + eps outside), so a
    caller that applies it with `p.addcdiv_(exp_avg, denom, value=-step_size)` reproduces torch.optim.AdamW bit for
    bit.
    """
    beta1, beta2 = betas
    state["step"] += 1
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]  # shaped like grad
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = float(state["step"])
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # shaped like grad
    return exp_avg, denom, lr / bias_correction1


def adamw_step_(p: torch.Tensor, state: dict[str, Any], lr: float, weight_decay: float,
                betas: tuple[float, float], eps: float) -> None:
    """One torch.optim.AdamW step of `p` on p.grad (decoupled decay, then the Adam step of `adam_moments`); the
    moments live in `state` and are created on first use. For the parameters a custom optimizer leaves plain."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg, denom, step_size = adam_moments(p.grad, state, betas, eps, lr)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def projected_param_groups(method: Full, model: nn.Module, weight_decay: float,
                           projected: Iterable[nn.Parameter], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The method's AdamW groups (decay on matrices, none on vectors) with the `projected` weights moved into a
    group of their own that carries the optimizer keys in `extra`; the other groups carry `extra`'s keys switched
    off by the optimizer's defaults."""
    ids = {id(p) for p in projected}
    groups: list[dict[str, Any]] = []
    proj: list[nn.Parameter] = []
    proj_decay = weight_decay
    for g in method.param_groups(model, weight_decay):
        mine = [p for p in g["params"] if id(p) in ids]
        if mine:
            proj += mine
            proj_decay = g["weight_decay"]
        rest = [p for p in g["params"] if id(p) not in ids]
        if rest:
            groups.append({**g, "params": rest})
    if len(proj) != len(ids):
        raise RuntimeError(f"{type(method).__name__}: {len(ids) - len(proj)} target weights are not trainable")
    if proj:
        groups.insert(0, {"params": proj, "weight_decay": proj_decay, **extra})
    return groups


def target_weights(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The 2-D weights of the named layers, in the order of `names`."""
    weights = [model.get_submodule(n).weight for n in names]
    for n, w in zip(names, weights):
        if w.ndim != 2:
            raise TypeError(f"layer {n} has a {w.ndim}-D weight; projected optimizers need 2-D weights")
    return weights


def svd_projector(grad: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """The top-`rank` singular vectors of the gradient G (m×n), in float32 or float64 (the reference casts to float):
    right=True: V_rᵀ (rank, n), the projection G·V_r; right=False: U_r (m, rank), the projection U_rᵀ·G."""
    g = grad.detach() if grad.dtype == torch.float64 else grad.detach().float()  # (m, n)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)  # (m, p), (p,), (p, n)
    return (vh[:rank] if right else u[:, :rank]).contiguous()  # (rank, n) or (m, rank)


def dct_basis(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II basis of R^size as the columns of Q (size, size): Q[j, k] = c_k·cos(π·k·(2j+1)/(2·size)),
    c_0 = √(1/size), c_k = √(2/size); QᵀQ = I. Built in float64, then cast."""
    j = torch.arange(size, dtype=torch.float64)[:, None]  # (size, 1) sample index
    k = torch.arange(size, dtype=torch.float64)[None, :]  # (1, size) frequency
    q = torch.cos(torch.pi * k * (2 * j + 1) / (2 * size)) * (2.0 / size) ** 0.5  # (size, size)
    q[:, 0] /= 2**0.5
    return q.to(device=device, dtype=dtype)


def dct_select(grad: torch.Tensor, basis: torch.Tensor, rank: int, right: bool, norm: float) -> torch.Tensor:
    """The `rank` basis columns most aligned with the gradient G (m×n): the largest ℓ_norm norms of the columns of
    G·Q (right, Q n×n) or of the rows of Qᵀ·G (left, Q m×m). One matmul and a top-k, no decomposition."""
    g = grad.to(basis.dtype)
    scores = (g @ basis).norm(p=norm, dim=0) if right else (basis.mT @ g).norm(p=norm, dim=1)  # (n,) or (m,)
    return torch.topk(scores, rank, sorted=True).indices  # (rank,)


def project_down(grad: torch.Tensor, proj: torch.Tensor, right: bool) -> torch.Tensor:
    """R = G·Pᵀ (m, r) with P = V_rᵀ (r, n), or R = Pᵀ·G (r, n) with P = U_r (m, r)."""
    return grad @ proj.mT if right else proj.mT @ grad  # (m, r) or (r, n)


def project_up(low: torch.Tensor, proj: torch.Tensor, right: bool) -> torch.Tensor:
    """The inverse map of project_down onto the subspace: R·P (m, n) or P·R (m, n)."""
    return low @ proj if right else proj @ low  # (m, n)


def projects_right(shape: torch.Size) -> bool:
    """GaLore's "std" side: project on the right (G·V_r) when m ≥ n, on the left (U_rᵀ·G) when m < n, so the
    projected gradient and its Adam state have the smaller of the two dimensions reduced to r."""
    return shape[0] >= shape[1]


# ========================================================================================== optimizer
class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose groups with `rank` set run Adam on the low-rank projection of each 2-D gradient (GaLore).

    For a weight W (m×n) of a projected group, with t the number of steps it has taken:
        if t mod T == 0:  P ← top-r singular vectors of G_t (V_rᵀ, r×n, when m ≥ n; else U_r, m×r)
        R_t = G_t·Pᵀ (m×r) or Pᵀ·G_t (r×n)
        M, V ← Adam moments of R_t;  N_t = M̂/(√V̂ + ε)
        W ← W·(1 − lr·λ) − lr·α·(N_t·P or P·N_t)
    Groups without `rank` (rank=None) are plain AdamW, computed exactly as torch.optim.AdamW does. The moments are
    kept across subspace refreshes and the step counter is not reset, as in the reference. All state (the projector
    P, the moments, the step) is in self.state[p], so state_dict()/load_state_dict() round-trips it.

    A group with `projection="dct"` chooses P without an SVD (the SVD-free variant, arXiv 2505.17967): P is r
    columns of the fixed orthonormal DCT basis Q of the reduced side, those whose ℓ_p alignment with G_t is largest
    (dct_select); only their indices are per-parameter state, and Q is built once per size and shared by every
    weight of that size (`shared_tensors`, counted by bench.train.optimizer_state_bytes).

    Args:
        params: parameters or groups; a group's `rank`, `scale` (α) and `update_proj_gap` (T) override the defaults.
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay, on the full weight).
        rank: r of projected groups; None (the default) leaves a group unprojected.
        scale: α, the multiplier of the projected update.
        update_proj_gap: T, the steps between subspace refreshes.
        projection: "svd" (GaLore) or "dct" (columns of the DCT basis chosen by alignment with the gradient).
        align_norm: p of the ℓ_p norm that ranks the DCT columns (the reference's default: 1).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = None, scale: float = 1.0,
                 update_proj_gap: int = 200, projection: str = "svd", align_norm: float = 1.0) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"need lr, eps, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, scale=scale,
                        update_proj_gap=update_proj_gap, projection=projection, align_norm=align_norm)
        super().__init__(params, defaults)
        self._bases: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # the shared DCT bases
        for group in self.param_groups:
            if group["projection"] not in ("svd", "dct"):
                raise ValueError(f"projection must be svd or dct, got {group['projection']!r}")
            if group["rank"] is not None:
                if int(group["rank"]) < 1 or int(group["update_proj_gap"]) < 1:
                    raise ValueError(f"need rank >= 1 and update_proj_gap >= 1, got {group['rank']}, "
                                     f"{group['update_proj_gap']}")
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"GaLore projects 2-D weights only, got a {p.ndim}-D parameter")

    @property
    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors the optimizer holds once for many parameters (the DCT bases), outside the per-parameter state."""
        return list(self._bases.values())

    def basis(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (size, like.dtype, like.device)
        if key not in self._bases:
            self._bases[key] = dct_basis(size, like.dtype, like.device)
        return self._bases[key]

    def projector(self, group: dict[str, Any], state: dict[str, Any], p: torch.Tensor, grad: torch.Tensor,
                  right: bool, refresh: bool) -> torch.Tensor:
        """P for this step: V_rᵀ (r, n) or U_r (m, r), from the SVD of G (svd) or the chosen DCT columns (dct)."""
        rank = min(int(group["rank"]), *p.shape)
        if group["projection"] == "svd":
            if refresh:
                state["projector"] = svd_projector(grad, rank, right).to(p.dtype)  # (r, n) or (m, r)
            return state["projector"]
        basis = self.basis(p.shape[1] if right else p.shape[0], p)  # (n, n) or (m, m)
        if refresh:
            state["indices"] = dct_select(grad, basis, rank, right, float(group["align_norm"]))  # (r,)
        columns = basis[:, state["indices"]]  # (n, r) or (m, r)
        return columns.mT if right else columns  # (r, n) or (m, r)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps, betas = group["lr"], group["weight_decay"], group["eps"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                grad, state = p.grad, self.state[p]
                if group["rank"] is None:
                    adamw_step_(p, state, lr, wd, betas, eps)
                    continue

                right = projects_right(p.shape)
                if not state:
                    state["step"] = 0
                refresh = state["step"] % int(group["update_proj_gap"]) == 0  # a new subspace from this gradient
                proj = self.projector(group, state, p, grad, right, refresh)  # (r, n) or (m, r)
                low = project_down(grad, proj, right)  # (m, r) or (r, n)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(low)  # (m, r) or (r, n)
                    state["exp_avg_sq"] = torch.zeros_like(low)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                exp_avg, denom, step_size = adam_moments(low, state, betas, eps, lr)
                normed = exp_avg / denom  # (m, r) or (r, n): N_t
                p.add_(project_up(normed, proj, right), alpha=-step_size * float(group["scale"]))
        return loss


# ============================================================================================= method
class GaLore(Full):
    """GaLore: W ← W − lr·α·P·Adam(PᵀG) for the target weights (P = top-r singular vectors of G, refreshed every
    T steps), AdamW for every other parameter; all weights are trained in full.

    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507;
    reference jiaweizzhao/GaLore @ 2cc66f88cce189e505affbb91042a8e77f5bf4e9 (galore_torch/adamw.py,
    galore_torch/galore_projector.py, run_glue.py).

    For each target weight W (m×n), Algorithm 2 of the paper: every T steps P is recomputed from the SVD of the
    current gradient G: the top-r right singular vectors V_rᵀ (r×n) when m ≥ n, else the left ones U_r (m×r) (the
    reference's "std" side, so the smaller dimension is reduced); Adam runs on R = G·V_r (m×r) or U_rᵀ·G (r×n), and
    the update is −lr·α·(N·V_rᵀ or U_r·N), N = M̂/(√V̂ + ε). The Adam state of a target weight is therefore m×r or
    r×n (plus P itself), against 2·m·n for AdamW. Moments and step are kept across refreshes, as in the reference.
    Biases, norms, embeddings, the task head and non-target matrices use plain AdamW (the reference's regular group).
    delta_weights, merge and the trainable count are full fine-tuning's.

    Differences from the reference:
    - Adam's ε is added to the bias-corrected √V̂ (torch.optim.AdamW's and the paper's Algorithm 2), where the
      reference's Hugging-Face-style AdamW adds it to the uncorrected √V; the reference's default ε is 1e-6, here the
      harness's 1e-8. Decoupled weight decay is applied before the update (torch's order), the reference after it.
    - Non-target parameters follow the harness's grouping (weight decay on matrices only); the reference's GLUE
      script passes no weight decay to GaLoreAdamW at all.
    - The projector is a tensor in the optimizer state (the reference keeps a Python object), so checkpoints
      round-trip; the SVD side is decided by the weight's shape, not re-guessed from the low-rank shape as the
      reference's project_back does; r is capped at min(m, n).
    - Target layers are the harness's target_modules (suffix match); the reference's GLUE script selects
      query/key/value/intermediate.dense/output.dense by substring, the same layers of a BERT encoder.

    Args:
        lr: learning rate (of both the projected and the AdamW parameters; the projected update is further
            multiplied by alpha).
        target_modules: the layers whose weight is trained through the low-rank projection (and whose ΔW is
            recorded for analysis).
        r: rank of the projection.
        alpha: the scale α of the projected update.
        update_proj_gap: T, steps between subspace refreshes.
    """

    family = "optimizer"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int = 4, alpha: float = 4.0, update_proj_gap: int = 500) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if int(r) < 1 or int(update_proj_gap) < 1 or not alpha > 0:
            raise ValueError(f"need r >= 1, update_proj_gap >= 1, alpha > 0; got {r}, {update_proj_gap}, {alpha}")
        self.r, self.alpha, self.update_proj_gap = int(r), float(alpha), int(update_proj_gap)
        self._targets: list[str] = []

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._targets = list(self.target_layers(model, ctx))
        return super().wrap(model, ctx)

    def projection(self) -> dict[str, Any]:
        """The projected group's GaLoreAdamW keys."""
        return {"rank": self.r, "scale": self.alpha, "update_proj_gap": self.update_proj_gap}

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        groups = projected_param_groups(self, model, weight_decay, target_weights(model, self._targets),
                                        self.projection())
        return GaLoreAdamW(groups, lr=self.lr, betas=betas, eps=eps)


class DCTAdamW(GaLore):
    """SVD-free GaLore: W ← W − lr·α·P·Adam(PᵀG) with P = the r columns of a fixed orthonormal DCT basis Q most
    aligned with G (largest ℓ1 norms of G·Q's columns, or of Qᵀ·G's rows), re-chosen every T steps; AdamW elsewhere.

    Modoranu, Safaryan, Schultheis, Alistarh, "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
    Models", arXiv 2505.17967 (v1; later versions are titled "FFT-based Dynamic Subspace Selection for Low-Rank
    Adaptive Optimization of Large Language Models"); reference IST-DASLab/ISTA-DASLab-Optimizers @
    4273852f02324074555685cf276835a2fff9f7fd (ista_daslab_optimizers/fft_low_rank/dct_adamw.py, fft_projector.py,
    utils/dct.py).

    Everything but the choice of P is GaLore's (the class above, and GaLoreAdamW with projection="dct"): the same
    side (right, G·P, when m ≥ n; left, Pᵀ·G, when m < n), the same Adam on the r-dimensional projection with its
    moments kept across refreshes, the same scale α. Choosing P costs one matmul with Q and a top-k instead of an
    SVD; the state per target weight is its r indices and the m×r (or r×n) moments, and one Q (n×n) per distinct
    reduced size is shared by all weights of that size.

    Where this follows or leaves the reference:
    - Q's columns are the DCT-II cosine vectors (the reference's Makhoul/FFT path, whose similarity is the DCT-II of
      G's rows); its matmul path uses the transposed matrix, whose columns are the DCT-III vectors. Both are
      orthonormal bases; the cosine vectors are the "DCT basis" of the paper's text.
    - Alignment by the ℓ1 norm (the reference's default ell_norm=1), top-r by torch.topk.
    - Not implemented: the reference's optional rotation of the moments into the new subspace and its error-feedback
      buffer (both off by default there, and not part of the v1 paper); its rule that sends very large matrices
      (either side ≥ 32,000, embeddings and LM heads) to plain AdamW: here only the target_modules are projected.
    - T, r and α default to GaLore's GLUE values in this suite, so the two differ only in how P is found.

    Args:
        lr: learning rate (the projected update is further multiplied by alpha).
        target_modules: the layers whose weight is trained through the projection.
        r: number of DCT columns (rank of the projection).
        alpha: the scale α of the projected update.
        update_proj_gap: T, steps between re-choosing the columns.
        align_norm: p of the ℓ_p norm that ranks the columns (the reference's default 1).
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int = 4, alpha: float = 4.0, update_proj_gap: int = 500, align_norm: float = 1.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, update_proj_gap=update_proj_gap)
        if not align_norm > 0:
            raise ValueError(f"align_norm must be > 0, got {align_norm}")
        self.align_norm = float(align_norm)

    def projection(self) -> dict[str, Any]:
        return {**super().projection(), "projection": "dct", "align_norm": self.align_norm}
