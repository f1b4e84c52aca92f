"""TriAdaptLoRA: ΔW = (α/ρ)·B·C·A with a square core C assembled from triangular blocks; layers whose core grows
fastest gain rank, on a schedule that spends a total rank budget by the end of training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext, rank_summary
from methods.increlora import rescale_in_place
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod

Growth = Literal["linear", "nonlinear"]


class TriAdaptLoRALinear(AdaptedLinear):
    """y = W0·x + (α/ρ)·B·C·A·x with A (ρ×n), B (m×ρ), C (ρ×ρ), ρ the layer's current rank.

    The rank grows by blocks of k_j components; with s_j = k_0 + … + k_j, block j owns A_j (k_j×n), B_j (m×k_j),
    a row block R_j (k_j×s_j) of C — rows s_{j−1}..s_j, columns 0..s_j: C's lower triangle, diagonal block included —
    and, for j ≥ 1, a column block U_j (s_{j−1}×k_j) — rows 0..s_{j−1}, columns s_{j−1}..s_j: the strict upper
    triangle. So C = Σ_j R_j + Σ_j U_j (placed) has exactly ρ² free entries.
    """

    def __init__(self, base: nn.Linear, alpha: float, dropout: float) -> None:
        super().__init__(base)
        self.alpha = float(alpha)
        self.A = nn.ParameterList()  # A_j: (k_j, n)
        self.B = nn.ParameterList()  # B_j: (m, k_j)
        self.C_row = nn.ParameterList()  # R_j: (k_j, s_j)
        self.C_col = nn.ParameterList()  # U_j: (s_{j-1}, k_j), j >= 1
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def block_sizes(self) -> list[int]:
        return [a.shape[0] for a in self.A]

    @property
    def rank(self) -> int:
        return sum(self.block_sizes)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def add_block(self, a: torch.Tensor, b: torch.Tensor, c_row: torch.Tensor, c_col: torch.Tensor | None) -> None:
        """Append block j: a (k×n), b (m×k), c_row (k×s_j), c_col (s_{j−1}×k; None for the first block)."""
        w = self.base.weight
        k, s_prev = a.shape[0], self.rank
        if b.shape != (self.out_features, k) or c_row.shape != (k, s_prev + k):
            raise ValueError(f"block shapes do not fit: b {tuple(b.shape)}, c_row {tuple(c_row.shape)} for k={k}")
        self.A.append(nn.Parameter(a.to(w.device, w.dtype, copy=True)))
        self.B.append(nn.Parameter(b.to(w.device, w.dtype, copy=True)))
        self.C_row.append(nn.Parameter(c_row.to(w.device, w.dtype, copy=True)))
        if s_prev:
            assert c_col is not None and c_col.shape == (s_prev, k)
            self.C_col.append(nn.Parameter(c_col.to(w.device, w.dtype, copy=True)))

    def core(self) -> torch.Tensor:
        """C (ρ×ρ): the row blocks on and below the diagonal plus the column blocks above it."""
        rho, ends = self.rank, [0]
        for k in self.block_sizes:
            ends.append(ends[-1] + k)
        lower = torch.cat([F.pad(r, (0, rho - r.shape[1])) for r in self.C_row], dim=0)  # (ρ, ρ)
        cols = [self.C_row[0].new_zeros(rho, self.block_sizes[0])]  # block 0 has no column block
        cols += [F.pad(u, (0, 0, 0, rho - u.shape[0])) for u in self.C_col]  # (ρ, k_j) each
        return lower + torch.cat(cols, dim=1)  # (ρ, ρ)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(list(self.A), dim=0), torch.cat(list(self.B), dim=1)  # (ρ, n), (m, ρ)

    def delta(self) -> torch.Tensor:
        a, b = self.stacked()
        return self.scaling * b @ self.core() @ a  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stacked()
        z = F.linear(F.linear(self.dropout(x), a), self.core())  # (..., ρ)  C·A·x
        return self.base(x) + self.scaling * F.linear(z, b)  # (..., m)

    def normalized_core_norm(self) -> float:
        """‖C‖_F / number of blocks, the quantity whose growth is the layer's importance."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.core().float())) / len(self.A)


class TriAdaptLoRA(SwapMethod):
    """TriAdaptLoRA: ΔW = (α/ρ)·B·C·A per layer (C square, from lower-triangular row blocks and upper-triangular
    column blocks), starting at ρ = init_rank. Every `incre_interval` steps after t_w, while the total rank R
    is below R_tgt = reference_rank × #layers, the n_t layers whose ‖C‖_F/#blocks grew most since the last check gain
    incre_rank_num (reference_rank/2) components, with n_t = (R_tgt − R)·(t − t_w)/(T − t_w) ("linear") or
    (R_tgt − R)^((t − t_w)/(T − t_w)) ("nonlinear"), T the run's steps. Loss += orth_reg_weight × orthogonality.
    With preserve_output_on_growth (default) a growth multiplies the grown layer's existing C by ρ_new/ρ_old so the
    output does not jump; false gives the public code's plain α/ρ rescale.

    Liang, Wang and Zeng, "TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation for
    Parameter-Efficient Fine-Tuning", arXiv 2501.08008. No authors' repository was found; a public PEFT-style
    implementation (`TriAdaptLoraConfig`/`RankAllocator`, seen in part, repository unnamed) was read for the
    schedule, the score and the regulariser.

    Init and growth (function-preserving, and every factor can learn):
    - First block: A ~ N(0, 0.02²), B = 0, C = I; so the model starts at the base and B·C·A = B·A, a LoRA.
    - A new block of k: A_new ~ N(0, 0.02²), B_new = 0, row block [0 | I_k], column block 0, so
      C ← [[C, 0], [0, I_k]] and B·C·A is unchanged; ΔW changes only by the α/ρ rescale, ρ_old/ρ_new, as in the
      public code, unless preserve_output_on_growth (default true) first multiplies the existing row and column
      blocks of C by ρ_new/ρ_old: C ← [[(ρ_new/ρ_old)·C, 0], [0, I_k]], so ΔW and the output are unchanged. Their
      AdamW moments are re-expressed in the new units (exp_avg ÷ ρ_new/ρ_old, exp_avg_sq ÷ its square; see
      methods.increlora.rescale_in_place).
    - The public implementation initialises B and C at zero (and every new block's A, B, C at zero): then
      ∂L/∂B = G·(CA)ᵀ = 0 and ∂L/∂C = Bᵀ·G·Aᵀ = 0 forever and only the first A moves. Here C ≠ 0, so B learns from
      step 0 and C (and the new A) as soon as B ≠ 0.
    - New parameters enter the optimizer with fresh state (on_step_end returns True and the loop rebuilds the
      optimizer, keeping the state of the surviving parameters).

    Where this differs from that implementation:
    - C's diagonal blocks are parameterised once (row blocks include them, column blocks stop above them): ρ² free
      entries; the public code's row and column blocks both cover the diagonal blocks (summed).
    - The score of a layer is the growth of ‖C‖_F/#blocks since the previous check, and a layer that grew is
      re-baselined after its growth, so that neither the new identity block nor the larger block count counts as
      importance (with its zero-initialised blocks the public code records the value before growth).
    - Budget: the top n_t layers (ties by layer order) gain min(incre_rank_num, budget left, min(m, n) − ρ), so R never
      exceeds R_tgt; the public code's threshold selects every layer at or above the n_t-th score and adds the full
      increment to each.
    - The paper's own hyper-parameters for GLUE could not be checked (paper text not available to us); the YAML says
      where each default comes from.

    Args:
        lr: learning rate (AdamW).
        target_modules: module-name suffixes to adapt.
        init_rank: rank of every layer at the start.
        reference_rank: target average rank; the budget R_tgt is reference_rank × #layers.
        target_total_rank: R_tgt; None: reference_rank × #layers.
        incre_rank_num: components a selected layer gains; None: max(1, reference_rank // 2).
        alpha: scaling numerator; ΔW is scaled by alpha / ρ.
        dropout: dropout on the adapter input.
        warmup_ratio: t_w = round(warmup_ratio · T), the steps before the first growth.
        incre_interval: steps between growth checks.
        growth: "linear" or "nonlinear" schedule of n_t.
        orth_reg_weight: weight of the orthogonality regulariser.
        init_std: standard deviation of the normal init of A.
        total_steps: T when the context does not give the run's steps (WrapContext.max_steps wins).
        preserve_output_on_growth: at a growth, multiply the grown layer's existing C by ρ_new/ρ_old (and
            re-express its AdamW moments) so ΔW is unchanged; false: the public code's plain α/ρ rescale.
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        init_rank: int = 1,
        reference_rank: int = 8,
        target_total_rank: int | None = None,
        incre_rank_num: int | None = None,
        alpha: float = 16.0,
        dropout: float = 0.0,
        warmup_ratio: float = 0.1,
        incre_interval: int = 1,
        growth: Growth = "linear",
        orth_reg_weight: float = 0.5,
        init_std: float = 0.02,
        total_steps: int | None = None,
        preserve_output_on_growth: bool = True,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if init_rank < 1 or reference_rank < init_rank:
            raise ValueError(f"need 1 <= method.init_rank <= method.reference_rank, got {init_rank}, "
                             f"{reference_rank}")
        if not 0 <= warmup_ratio < 1 or incre_interval < 1:
            raise ValueError(f"need 0 <= method.warmup_ratio < 1 and method.incre_interval >= 1, got {warmup_ratio}, "
                             f"{incre_interval}")
        if growth not in ("linear", "nonlinear"):
            raise ValueError(f"method.growth must be linear or nonlinear, got {growth!r}")
        if incre_rank_num is not None and incre_rank_num < 1:
            raise ValueError(f"method.incre_rank_num must be >= 1 or null, got {incre_rank_num}")
        if not 0.0 <= dropout < 1.0 or orth_reg_weight < 0:
            raise ValueError(f"need dropout in [0, 1) and orth_reg_weight >= 0, got {dropout}, {orth_reg_weight}")
        self.init_rank, self.reference_rank, self.target_total_rank = int(init_rank), int(reference_rank), target_total_rank
        self.incre_rank_num = int(incre_rank_num) if incre_rank_num is not None else max(1, self.reference_rank // 2)
        self.alpha, self.dropout = float(alpha), float(dropout)
        self.warmup_ratio, self.incre_interval, self.growth = float(warmup_ratio), int(incre_interval), growth
        self.orth_reg_weight, self.init_std = float(orth_reg_weight), float(init_std)
        self.total_steps = total_steps
        self.preserve_output_on_growth = bool(preserve_output_on_growth)
        self._generator = torch.Generator()
        self._layers: dict[str, TriAdaptLoRALinear] = {}
        self.budget = self.total_rank = 0
        self.T = self.init_warmup = 0
        self.previous: dict[str, float] = {}  # {layer: ‖C‖_F/#blocks at the last check}

    # ----------------------------------------------------------------------------------------- setup
    def _new_block(self, layer: TriAdaptLoRALinear, k: int) -> None:
        """Append k components that leave B·C·A unchanged: A ~ N(0, σ²), B = 0, C ← [[C, 0], [0, I]]."""
        s = layer.rank
        a = torch.randn(k, layer.in_features, generator=self._generator) * self.init_std  # (k, n)
        b = torch.zeros(layer.out_features, k)  # (m, k)
        c_row = torch.cat([torch.zeros(k, s), torch.eye(k)], dim=1)  # (k, s + k)
        layer.add_block(a, b, c_row, torch.zeros(s, k) if s else None)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        layer = TriAdaptLoRALinear(base, self.alpha, self.dropout)
        self._new_block(layer, self.init_rank)
        return layer

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        T = ctx.max_steps if ctx.max_steps is not None else self.total_steps
        if T is None:
            raise ValueError("TriAdaptLoRA needs the run's steps: WrapContext.max_steps or method.total_steps")
        self.T, self.init_warmup = int(T), round(self.warmup_ratio * T)  # T > t_w: warmup_ratio < 1
        self._generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "triadaptlora"))
        model = super().wrap(model, ctx)
        self._layers = self.adapted_layers(model)  # type: ignore[assignment]  # load_state_dict restores their ranks
        self.total_rank = sum(layer.rank for layer in self._layers.values())
        self.budget = (self.target_total_rank if self.target_total_rank is not None
                       else self.reference_rank * len(self._layers))
        if self.budget < self.total_rank:
            raise ValueError(f"TriAdaptLoRA: the rank budget {self.budget} is below the initial total rank "
                             f"{self.total_rank}; raise method.reference_rank or method.target_total_rank")
        self.previous = {name: layer.normalized_core_norm() for name, layer in self._layers.items()}
        return model

    def layer_trainable(self, base: nn.Linear) -> int:
        r = self.init_rank
        return r * (base.in_features + base.out_features) + r * r  # A (r×n) + B (m×r) + C (r×r)

    # ---------------------------------------------------------------------------------- optimisation
    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """orth_reg_weight × mean over layers of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F."""
        if self.orth_reg_weight == 0:
            return None
        terms = []
        for layer in self.adapted_layers(model).values():
            a, b = layer.stacked()  # type: ignore[operator]  # (ρ, n), (m, ρ)
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)  # (ρ, ρ)
            terms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
        return self.orth_reg_weight * torch.stack(terms).mean()

    def layers_to_grow(self, step: int, n_layers: int) -> int:
        """n_t: how many layers gain rank at step t (at least 1, at most all)."""
        left = self.budget - self.total_rank
        frac = (step - self.init_warmup) / (self.T - self.init_warmup)
        n = left * frac if self.growth == "linear" else math.exp(frac * math.log(left))
        return max(1, min(n_layers, int(n)))

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if self.total_rank >= self.budget or step <= self.init_warmup or step % self.incre_interval:
            return False
        return bool(self.grow(model, step, optimizer))  # new parameters: the loop rebuilds the optimizer

    def grow(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Score every layer, give the top n_t their increment within the budget; {layer: components gained}.

        With preserve_output_on_growth, a grown layer's existing C blocks are multiplied by ρ_new/ρ_old first, and
        their moments in `optimizer` (when given) are re-expressed in the new units."""
        layers: dict[str, TriAdaptLoRALinear] = self.adapted_layers(model)  # type: ignore[assignment]
        now = {name: layer.normalized_core_norm() for name, layer in layers.items()}
        score = {name: now[name] - self.previous[name] for name in layers}
        self.previous = now
        order = sorted(layers, key=lambda name: -score[name])  # stable: ties keep the layer order
        grown: dict[str, int] = {}
        for name in order[:self.layers_to_grow(step, len(layers))]:
            layer = layers[name]
            k = min(self.incre_rank_num, self.budget - self.total_rank,
                    min(layer.in_features, layer.out_features) - layer.rank)
            if self.total_rank >= self.budget:
                break
            if k <= 0:
                continue
            if self.preserve_output_on_growth:  # (α/ρ_new)·B·(ρ_new/ρ_old)·C·A = (α/ρ_old)·B·C·A: ΔW unchanged
                rescale_in_place([*layer.C_row, *layer.C_col], (layer.rank + k) / layer.rank, optimizer)
            self._new_block(layer, k)
            self.total_rank += k
            self.previous[name] = layer.normalized_core_norm()  # re-baseline: the new block is not importance
            grown[name] = k
        return grown

    # ---------------------------------------------------------------------------------- after training
    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.adapted_layers(model).items()}  # type: ignore[misc]

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        return rank_summary("triadaptlora", self.ranks(model).values())

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "total_rank": self.total_rank,
                "previous": dict(self.previous),
                "block_sizes": {name: layer.block_sizes for name, layer in self._layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the block structure of the layers wrapped by wrap() (before the trainable tensors are loaded)."""
        if not state:
            return
        self._generator.set_state(state["generator"])
        self.total_rank = int(state["total_rank"])
        self.previous = {k: float(v) for k, v in state["previous"].items()}
        for name, sizes in state["block_sizes"].items():
            layer = self._layers[name]
            if layer.block_sizes == list(sizes):
                continue
            for kind in ("A", "B", "C_row", "C_col"):
                setattr(layer, kind, nn.ParameterList())
            for k in sizes:  # placeholders of the right shapes; the loaded trainable tensors overwrite them
                s = layer.rank
                layer.add_block(torch.zeros(k, layer.in_features), torch.zeros(layer.out_features, k),
                                torch.zeros(k, s + k), torch.zeros(s, k) if s else None)
