"""FRUGAL: Adam on a subspace of each target weight's gradient, state-free signSGD on the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from methods.base import WrapContext
from methods.full import Full
from methods.galore import (adam_moments, adamw_step_, project_down, project_up, projected_param_groups, projects_right,
                            svd_projector, target_weights)

PROJECTIONS = ("svd", "randk", "columns", "rows", "block")
_INDEXED = ("randk", "columns", "rows")


def _generator(seed: int, index: int, refresh: int) -> torch.Generator:
    """A CPU generator for the `refresh`-th subspace draw of parameter `index`: a pure function of its arguments,
    so a resumed optimizer draws the same subspaces as an uninterrupted one."""
    mixed = int(np.random.SeedSequence([seed, index, refresh]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(mixed & 0x7FFF_FFFF_FFFF_FFFF)


class FRUGALAdamW(torch.optim.Optimizer):
    """AdamW on a subspace of each gradient of the `frugal` groups, signSGD on the remainder (FRUGAL).

    For a weight W of a frugal group, with G its gradient and S_t the current subspace (refreshed every T steps):
        W ← W·(1 − lr·λ) − lr·Adam(G|S) − lr·κ·sign(G − G|S)
    where G|S is the part of G in S, Adam's state lives in S only, and κ = inactive_lr_scale. Subspaces (projection):
        svd      S = span of the top-k singular vectors of G at the refresh (right ones V_kᵀ when m ≥ n, k =
                 round(ρ·n); else left ones U_k, k = round(ρ·m)); Adam on G·V_k (m×k) or U_kᵀ·G (k×n)
        randk    k = ⌊ρ·m·n⌋ random entries; Adam on those entries
        columns  ⌊ρ·n⌋ random columns; rows: ⌊ρ·m⌋ random rows
        block    round(ρ·N) of the group's N weights, drawn at random, get AdamW on the whole weight; the other
                 weights get signSGD and keep no state
    At each refresh the Adam state is reset (step and moments, when reset_statistics). Groups with frugal=False are
    plain AdamW, computed exactly as torch.optim.AdamW does. The subspace draws are a pure function of (seed,
    parameter index, refresh count), and all state is in self.state[p], so state_dict()/load_state_dict() resumes
    a run exactly.

    Args:
        params: parameters or groups; a group's keys override the defaults below.
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay, applied to every weight, in S or not).
        frugal: whether a group is split into a state-full subspace and a state-free remainder.
        projection: svd, randk, columns, rows or block.
        density: ρ, the state-full fraction.
        update_gap: T, steps between subspace refreshes.
        inactive_lr_scale: κ, the signSGD learning rate relative to lr.
        reset_statistics: reset Adam's moments and step at each refresh.
        seed: seed of the random subspaces.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, frugal: bool = False, projection: str = "columns",
                 density: float = 0.25, update_gap: int = 200, inactive_lr_scale: float = 1.0,
                 reset_statistics: bool = True, seed: int = 0) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"need lr, eps, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, frugal=frugal, projection=projection,
                        density=density, update_gap=update_gap, inactive_lr_scale=inactive_lr_scale,
                        reset_statistics=reset_statistics, seed=seed)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not group["frugal"]:
                continue
            if group["projection"] not in PROJECTIONS:
                raise ValueError(f"projection must be one of {PROJECTIONS}, got {group['projection']!r}")
            if not 0.0 <= group["density"] <= 1.0 or int(group["update_gap"]) < 1 or group["inactive_lr_scale"] < 0:
                raise ValueError(f"need 0 <= density <= 1, update_gap >= 1, inactive_lr_scale >= 0; got "
                                 f"{group['density']}, {group['update_gap']}, {group['inactive_lr_scale']}")
            if group["projection"] != "block" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError(f"projection {group['projection']} needs 2-D weights")
        # load_state_dict casts every state tensor of a float parameter to its dtype: give indices back their type
        self.register_load_state_dict_post_hook(FRUGALAdamW._restore_index_dtype)

    @staticmethod
    def _restore_index_dtype(optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            if "index" in state:
                state["index"] = state["index"].long()

    # ---------------------------------------------------------------------------------- subspaces
    def _refresh(self, p: torch.Tensor, index: int, group: dict[str, Any]) -> None:
        """Draw the subspace of an svd/randk/columns/rows weight from its current gradient; reset Adam's state."""
        state, grad, rho = self.state[p], p.grad, float(group["density"])
        kind, m, n = group["projection"], p.shape[0], p.shape[1]
        if kind == "svd":
            right = projects_right(p.shape)
            rank = round((n if right else m) * rho)
            state["projector"] = svd_projector(grad, rank, right).to(p.dtype)  # (k, n) or (m, k)
            low_shape = (m, rank) if right else (rank, n)
        else:
            total = {"randk": m * n, "columns": n, "rows": m}[kind]
            gen = _generator(int(group["seed"]), index, state["refreshes"])
            state["index"] = torch.randperm(total, generator=gen)[:int(total * rho)].to(p.device)  # (k,)
            k = state["index"].numel()
            low_shape = {"randk": (k,), "columns": (m, k), "rows": (k, n)}[kind]
        state["refreshes"] += 1
        if group["reset_statistics"] or "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(low_shape, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(low_shape, dtype=p.dtype, device=p.device)

    def _refresh_blocks(self, group: dict[str, Any], first_index: int) -> None:
        """Block projection: draw round(ρ·N) active weights of the group; they get fresh AdamW state, the others
        lose theirs."""
        params = group["params"]
        lead = self.state[params[0]]
        active = round(len(params) * float(group["density"]))
        gen = _generator(int(group["seed"]), first_index, lead.get("refreshes", 0))
        chosen = set(torch.randperm(len(params), generator=gen)[:active].tolist())
        refreshes = lead.get("refreshes", 0) + 1
        for i, p in enumerate(params):
            state = self.state[p]
            t = state.get("t", 0)
            state.clear()
            state.update(t=t, refreshes=refreshes, active=i in chosen)
            if i in chosen:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    # ---------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first_index = 0
        for group in self.param_groups:
            lr, wd, eps, betas = group["lr"], group["weight_decay"], group["eps"], group["betas"]
            kind, gap = group["projection"], int(group["update_gap"])
            if group["frugal"] and kind == "block" and group["params"]:
                if self.state[group["params"][0]].get("t", 0) % gap == 0:
                    self._refresh_blocks(group, first_index)
            for index, p in enumerate(group["params"], start=first_index):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FRUGALAdamW does not support sparse gradients")
                grad, state = p.grad, self.state[p]
                if not group["frugal"]:
                    adamw_step_(p, state, lr, wd, betas, eps)
                    continue

                if kind != "block":
                    state.setdefault("t", 0)
                    state.setdefault("refreshes", 0)
                    if state["t"] % gap == 0:
                        self._refresh(p, index, group)
                state["t"] += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                lr_free = lr * float(group["inactive_lr_scale"])
                if kind == "block":
                    if state["active"]:
                        exp_avg, denom, step_size = adam_moments(grad, state, betas, eps, lr)
                        p.addcdiv_(exp_avg, denom, value=-step_size)
                    else:
                        p.add_(grad.sign(), alpha=-lr_free)
                    continue
                p.add_(self._subspace_update(grad, state, kind, p.shape, betas, eps, lr, lr_free))
            first_index += len(group["params"])
        return loss

    @staticmethod
    def _subspace_update(grad: torch.Tensor, state: dict[str, Any], kind: str, shape: torch.Size,
                         betas: tuple[float, float], eps: float, lr: float, lr_free: float) -> torch.Tensor:
        """−lr·Adam(G|S) − lr_free·sign(G − G|S) for an svd/randk/columns/rows subspace S."""
        if kind == "svd":
            right, proj = projects_right(shape), state["projector"]
            low = project_down(grad, proj, right)  # (m, k) or (k, n)
            exp_avg, denom, step_size = adam_moments(low, state, betas, eps, lr)
            update = project_up(torch.addcdiv(torch.zeros_like(low), exp_avg, denom, value=-step_size),
                                proj, right)  # (m, n)
            if proj.numel() and min(proj.shape) == (shape[1] if right else shape[0]):
                return update  # S is the whole space: the remainder is exactly zero (not its rounding noise)
            residual = grad - project_up(low, proj, right)  # (m, n)
            return update.add_(residual.sign_(), alpha=-lr_free)
        idx = state["index"]  # (k,)
        flat = grad.reshape(-1)
        low = {"randk": lambda: flat[idx], "columns": lambda: grad[:, idx], "rows": lambda: grad[idx]}[kind]()
        exp_avg, denom, step_size = adam_moments(low, state, betas, eps, lr)
        adam = torch.addcdiv(torch.zeros_like(low), exp_avg, denom, value=-step_size)  # shaped like low
        update = grad.sign().contiguous().mul_(-lr_free)  # (m, n): the remainder's signSGD step, overwritten on S below
        if kind == "randk":
            update.view(-1)[idx] = adam
        elif kind == "columns":
            update[:, idx] = adam
        else:
            update[idx] = adam
        return update


# ============================================================================================= method
class FRUGAL(Full):
    """FRUGAL: W ← W − lr·Adam(G|S) − lr·κ·sign(G − G|S) for the target weights (S: a subspace of density ρ,
    redrawn every T steps with Adam's state reset), AdamW for every other parameter; all weights are trained.

    Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
    arXiv 2411.07837. The authors' repository is not in the store; read at hungquangbui02022003/FRUGAL
    @ 6d7bf46dfc079c3e2269df3f876538d673f1f3ba, a copy of it with later additions (frugal/proj_optimizer_templates.py,
    frugal/adamw.py, frugal/galore_projector.py, frugal/coordinate_projector.py, run_glue.py, utils/).

    The gradient of each target weight is split into a state-full part in a subspace S and a state-free remainder
    (Algorithm 1): Adam, with its moments living in S only, updates along G|S; the remainder G − G|S is updated with
    signSGD, lr·κ·sign(·), which needs no state. S is redrawn every T steps and Adam's moments and step restart. The
    projection is SVD (top singular vectors of G, the GaLore side rule), RandK (random entries, or whole random
    columns/rows) or block (a random fraction ρ of the target weights trained by AdamW, the others by signSGD). The
    non-target parameters (biases, norms, embeddings, head) use AdamW, as the reference's regular group. With ρ = 1
    (randk, columns, rows, block) the update is AdamW's exactly; with ρ = 0 it is signSGD's (tests/methods/
    test_frugal.py). With svd and ρ = 1, Adam runs in the rotated basis of G's singular vectors, which is not AdamW.

    Differences from the reference:
    - The subspace draws use a generator seeded from (run seed, parameter index, refresh count), not the global RNG,
      so a resumed run draws the same subspaces; the reference's indices are kept as state the same way.
    - svd with the subspace equal to the whole space leaves the remainder at exactly zero; the reference takes the
      sign of G − P·Pᵀ·G, i.e. of its rounding noise (a full-lr signSGD step on noise, only at ρ = 1).
    - proj_params_lr_scale (1.0 in all of the paper's experiments) is not exposed; block order is random only (the
      reference also has ascending/descending/mirror); proj_side is the reference default "std".
    - The reference's fine-tuning script freezes embeddings (freeze_embeddings defaults to true) and sets ρ from a
      "rank" (ρ = rank/768, 0 for rank 0); here every parameter trains and ρ is given directly (spec default 0.25).
    - Weight decay follows the harness's grouping (matrices only); the reference's BERT groups exclude biases and
      LayerNorm weights, which is the same set.

    Args:
        lr: learning rate (AdamW's, and of the state-full subspace).
        target_modules: the layers whose weight is split into subspace + remainder (and whose ΔW is recorded).
        density: ρ, the state-full fraction of each target weight (of the target weights, for block).
        update_gap: T, steps between subspace refreshes.
        projection: svd, randk, columns, rows or block.
        inactive_lr_scale: κ, the signSGD learning rate relative to lr.
        reset_statistics: reset Adam's state at each refresh (the method's default).
    """

    family = "optimizer"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 density: float = 0.25, update_gap: int = 200, projection: str = "columns",
                 inactive_lr_scale: float = 0.1, reset_statistics: bool = True) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if not 0.0 <= density <= 1.0 or int(update_gap) < 1 or inactive_lr_scale < 0:
            raise ValueError(f"need 0 <= density <= 1, update_gap >= 1, inactive_lr_scale >= 0; got "
                             f"{density}, {update_gap}, {inactive_lr_scale}")
        self.density, self.update_gap, self.projection = float(density), int(update_gap), projection
        self.inactive_lr_scale, self.reset_statistics = float(inactive_lr_scale), bool(reset_statistics)
        self._targets: list[str] = []
        self._seed = 0

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._targets = list(self.target_layers(model, ctx))
        self._seed = int(ctx.seed)
        return super().wrap(model, ctx)

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        groups = projected_param_groups(
            self, model, weight_decay, target_weights(model, self._targets),
            {"frugal": True, "projection": self.projection, "density": self.density, "update_gap": self.update_gap,
             "inactive_lr_scale": self.inactive_lr_scale, "reset_statistics": self.reset_statistics,
             "seed": self._seed})
        return FRUGALAdamW(groups, lr=self.lr, betas=betas, eps=eps)
