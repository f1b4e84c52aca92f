"""IncreLoRA: start every layer at rank 1 and add rank-1 components, during training, to the layers whose update is
most important, until a total rank budget is spent."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext, rank_summary
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod


def rescale_in_place(params: Sequence[nn.Parameter], factor: float, optimizer: torch.optim.Optimizer | None) -> None:
    """p ← factor·p (no_grad, the same Parameter objects), and their AdamW moments re-expressed in the new units.

    The output depends on p only through p/factor afterwards, so the gradient w.r.t. p scales by 1/factor; the moments
    (EMAs of past gradients) are transformed the same way: exp_avg ← exp_avg/factor, exp_avg_sq (and max_exp_avg_sq)
    ← ·/factor². They then equal the EMAs of the gradients of the new parametrisation along the same trajectory, and
    the next AdamW update m̂/(√v̂ + ε) keeps its value (up to ε): Adam is invariant to a constant gradient scale.
    (Scaling exp_avg by factor and exp_avg_sq by factor² would keep m/√v too, but would weigh the history factor²
    times more than the new, 1/factor-sized gradients.) The step count is kept, so the bias correction goes on.
    """
    if factor == 1.0:
        return
    with torch.no_grad():
        for p in params:
            p.mul_(factor)
            state = optimizer.state.get(p) if optimizer is not None else None
            if not state:
                continue
            if "exp_avg" in state:
                state["exp_avg"].div_(factor)
            for key in ("exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key].div_(factor * factor)


class IncreLoRALinear(AdaptedLinear):
    """y = W0·x + (α/ρ)·Σ_i e_i·b_i·a_iᵀ·x over the layer's components, ρ = the number of active ones.

    Each component is its own trio of parameters a_i (1×n), b_i (m×1), e_i (1,). Components [0, n_active) are
    active (all three trainable); the rest are the reserve, pre-trained before they join: with advance learning a_i,
    b_i train while e_i stays frozen at a small value (1e-5), otherwise all three are frozen and e_i = 0.

    While the method still grows (`track`), the training forward forms ΔW explicitly and keeps ∂L/∂ΔW (summed over
    the step's micro-batches) for the importance score |ΔW ⊙ ∂L/∂ΔW|; otherwise it uses the factored form.
    """

    def __init__(self, base: nn.Linear, alpha: float, dropout: float) -> None:
        super().__init__(base)
        self.alpha = float(alpha)
        self.A = nn.ParameterList()  # a_i: (1, n) each
        self.B = nn.ParameterList()  # b_i: (m, 1) each
        self.E = nn.ParameterList()  # e_i: (1,) each
        self.n_active = 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.track = False
        self._delta_seen: torch.Tensor | None = None  # ΔW of the step's forward passes
        self._delta_grad: torch.Tensor | None = None  # ∂L/∂ΔW summed over the step's micro-batches

    @property
    def n_components(self) -> int:
        return len(self.A)

    @property
    def scaling(self) -> float:
        return self.alpha / self.n_active

    def append(self, a: torch.Tensor, b: torch.Tensor, e: float, train_ab: bool, train_e: bool) -> None:
        """Add one component (a: (1, n), b: (m, 1)) at the end, on the base layer's device and dtype."""
        w = self.base.weight
        self.A.append(nn.Parameter(a.to(w.device, w.dtype, copy=True), requires_grad=train_ab))
        self.B.append(nn.Parameter(b.to(w.device, w.dtype, copy=True), requires_grad=train_ab))
        self.E.append(nn.Parameter(torch.full((1,), float(e), device=w.device, dtype=w.dtype), requires_grad=train_e))

    def activate(self, k: int) -> None:
        """The first k reserve components become active (and fully trainable)."""
        if self.n_active + k > self.n_components:
            raise RuntimeError(f"cannot activate {k} components: only {self.n_components - self.n_active} in reserve")
        for i in range(self.n_active, self.n_active + k):
            for p in (self.A[i], self.B[i], self.E[i]):
                p.requires_grad_(True)
        self.n_active += k

    def truncate(self, n: int) -> None:
        """Keep the first n components (the same Parameter objects, so optimizer state survives)."""
        self.A = nn.ParameterList(list(self.A)[:n])
        self.B = nn.ParameterList(list(self.B)[:n])
        self.E = nn.ParameterList(list(self.E)[:n])

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.cat(list(self.A), dim=0)  # (k, n)
        b = torch.cat(list(self.B), dim=1)  # (m, k)
        e = torch.cat(list(self.E))  # (k,)
        return a, b, e

    def delta(self) -> torch.Tensor:
        a, b, e = self.stacked()
        return self.scaling * (b * e) @ a  # (m, n)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self._delta_grad = grad.detach() if self._delta_grad is None else self._delta_grad + grad.detach()

    def take_score(self) -> float | None:
        """Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn) of the step just back-propagated (the reference's score); None without one."""
        if self._delta_grad is None or self._delta_seen is None:
            return None
        d, g = self._delta_seen, self._delta_grad
        score = float((d * g).abs().sum()) / math.sqrt(d.numel())
        self._delta_seen = self._delta_grad = None
        return score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track and torch.is_grad_enabled():
            d = self.delta()  # (m, n)
            if d.requires_grad:
                d.register_hook(self._keep_grad)
                self._delta_seen = d.detach()
            return self.base(x) + F.linear(self.dropout(x), d)  # (..., m)
        a, b, e = self.stacked()
        z = F.linear(self.dropout(x), a) * e  # (..., k)
        return self.base(x) + self.scaling * F.linear(z, b)  # (..., m)


class IncreLoRA(SwapMethod):
    """IncreLoRA: ΔW = (α/ρ)·Σ_{i≤ρ} e_i·b_i·a_iᵀ per layer, starting at ρ = init_rank; every `incre_interval` steps
    after `init_warmup`, the `top_h` layers with the highest importance gain `incre_rank_num` components each, until
    the total rank reaches target_rank × #layers (or target_total_rank). Loss += orth_reg_weight × orthogonality.
    With preserve_output_on_growth (default) a growth multiplies the grown layer's e_i by ρ_new/ρ_old so the output
    does not jump; false gives the reference's plain α/ρ rescale.

    Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
    arXiv 2308.12043; reference FeiyuZhang98/IncreLoRA @ 51a2d734af7883ef90425206057c1ef25997b359
    (loralib/loralib/increlora.py `SVDLinear`, `RankAllocator`, `compute_orth_regu`; NLU/src/transformers/trainer.py;
    NLU/scripts/rank=2/run_sst2.sh).

    As in the reference:
    - Init: a_i, b_i ~ N(0, 0.02²), e_i = 0 for the init_rank active components, so the model starts at the base
      (up to the reserve's e = 1e-5 term, ~1e-7 relative). α/ρ with ρ the current number of active components, as
      the reference's `ranknum`; with preserve_output_on_growth false a growth therefore rescales the existing
      components by ρ_old/ρ_new, as in the reference (the default is below).
    - Advance learning: every layer keeps `incre_rank_num` reserve components whose a, b train (e frozen at 1e-5);
      when a layer is selected its reserve becomes active (e trainable, starting from 1e-5) and a fresh reserve is
      drawn. With advance_learn false the reserve is frozen with e = 0 until selected.
    - Importance of a layer: s = Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn) each step, Ī ← β1·Ī + (1−β1)·s,
      Ū ← β2·Ū + (1−β2)·|s − Ī|, score Ī·Ū (β1 = β2 = 0.85), updated every step while the budget is not spent.
    - Growth at steps t > init_warmup with t % incre_interval == 0 (t counts optimizer steps from 0), top_h layers.
      The new parameters go to the optimizer with fresh state (on_step_end returns True; the loop rebuilds the
      optimizer and keeps the state of every surviving parameter, the pre-trained reserve included).

    Where this differs from the reference:
    - Budget: a selected layer gains min(incre_rank_num, budget left), and exactly the top_h layers are selected
      (ties by layer order), so the total never exceeds the budget; the reference's threshold can select more layers
      on ties and overshoot when incre_rank_num > 1, after which it never reaches `total == target` and keeps its
      reserves forever. When the budget is spent, the reserves are removed (the reference zeroes their e and keeps
      training their a, b, which then have no effect).
    - Orthogonality: mean over layers of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F with A (k×n), B (m×k) stacking all the layer's
      components (the paper's regulariser, AdaLoRA's). The reference's `compute_orth_regu` iterates over its
      parameters one by one, which are single components, so it only pulls each ‖a_i‖², ‖b_i‖² towards 1.
    - The score uses ∂L/∂ΔW summed over the step's micro-batches (the reference's hook keeps the last one's).
    - Not implemented: the reference's per-group restarted warmup of the learning rate for new parameters
      (`multi_lr`): new parameters follow the run's schedule from where it is.
    - ρ has no +1e-5 (the reference divides by ranknum + 1e-5; ρ ≥ 1 here).
    - preserve_output_on_growth (default true) folds ρ_new/ρ_old into the e of a grown layer's components (the
      previously active ones and the joining reserve) at each growth, so ΔW, and the model's output, is unchanged
      (up to the fresh reserve's e = 1e-5 term with advance learning); their AdamW moments are re-expressed in the
      new units (`rescale_in_place`). The reference does not: its output jumps by ρ_old/ρ_new on the adapter part.

    Args:
        lr: learning rate (AdamW).
        target_modules: module-name suffixes to adapt.
        init_rank: active components per layer at the start (the reference's lora_r).
        target_rank: average rank per layer at the end; the budget is target_rank × #layers.
        target_total_rank: the total rank budget; None: target_rank × #layers.
        alpha: scaling numerator; ΔW is scaled by alpha / ρ.
        dropout: dropout on the adapter input.
        init_warmup: steps before the first growth.
        incre_interval: steps between growths.
        top_h: layers selected per growth.
        incre_rank_num: components a selected layer gains; None: max(1, target_rank // 2) (the reference's table).
        advance_learn: pre-train the reserve components (a, b trainable, e = reserve_e frozen).
        reserve_e: e of a reserve component with advance learning.
        init_std: standard deviation of the normal init of a_i, b_i.
        beta1: EMA coefficient of the importance.
        beta2: EMA coefficient of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser.
        preserve_output_on_growth: at a growth, multiply e of the grown layer's components by ρ_new/ρ_old (and
            re-express their AdamW moments) so ΔW is unchanged; false: the reference's plain α/ρ rescale.
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        init_rank: int = 1,
        target_rank: int = 2,
        target_total_rank: int | None = None,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init_warmup: int = 1000,
        incre_interval: int = 1000,
        top_h: int = 2,
        incre_rank_num: int | None = None,
        advance_learn: bool = True,
        reserve_e: float = 1e-5,
        init_std: float = 0.02,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.1,
        preserve_output_on_growth: bool = True,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if init_rank < 1 or target_rank < init_rank:
            raise ValueError(f"need 1 <= method.init_rank <= method.target_rank, got {init_rank}, {target_rank}")
        if init_warmup < 0 or incre_interval < 1 or top_h < 1:
            raise ValueError("need method.init_warmup >= 0, method.incre_interval >= 1, method.top_h >= 1; got "
                             f"{init_warmup}, {incre_interval}, {top_h}")
        if incre_rank_num is not None and incre_rank_num < 1:
            raise ValueError(f"method.incre_rank_num must be >= 1 or null, got {incre_rank_num}")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"method.beta1 and method.beta2 must lie in (0, 1), got {beta1}, {beta2}")
        if not 0.0 <= dropout < 1.0 or orth_reg_weight < 0:
            raise ValueError(f"need dropout in [0, 1) and orth_reg_weight >= 0, got {dropout}, {orth_reg_weight}")
        self.init_rank, self.target_rank, self.target_total_rank = int(init_rank), int(target_rank), target_total_rank
        self.alpha, self.dropout = float(alpha), float(dropout)
        self.init_warmup, self.incre_interval, self.top_h = int(init_warmup), int(incre_interval), int(top_h)
        self.incre_rank_num = int(incre_rank_num) if incre_rank_num is not None else max(1, self.target_rank // 2)
        self.advance_learn, self.reserve_e, self.init_std = bool(advance_learn), float(reserve_e), float(init_std)
        self.beta1, self.beta2, self.orth_reg_weight = float(beta1), float(beta2), float(orth_reg_weight)
        self.preserve_output_on_growth = bool(preserve_output_on_growth)
        self._generator = torch.Generator()
        self._layers: dict[str, IncreLoRALinear] = {}
        self.budget = 0
        self.total_rank = 0
        self.ema: dict[str, list[float]] = {}  # {layer: [Ī, Ū]}

    # ----------------------------------------------------------------------------------------- setup
    def _draw(self, layer: IncreLoRALinear, k: int, active: bool) -> None:
        """Append k components drawn from the method's generator: active ones (e = 0, all trainable) or reserve."""
        for _ in range(k):
            a = torch.randn(1, layer.in_features, generator=self._generator) * self.init_std  # (1, n)
            b = torch.randn(layer.out_features, 1, generator=self._generator) * self.init_std  # (m, 1)
            if active:
                layer.append(a, b, 0.0, train_ab=True, train_e=True)
            elif self.advance_learn:
                layer.append(a, b, self.reserve_e, train_ab=True, train_e=False)
            else:
                layer.append(a, b, 0.0, train_ab=False, train_e=False)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        layer = IncreLoRALinear(base, self.alpha, self.dropout)
        self._draw(layer, self.init_rank, active=True)
        layer.n_active = self.init_rank
        self._draw(layer, self.incre_rank_num, active=False)
        return layer

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "increlora"))
        model = super().wrap(model, ctx)
        self._layers = self.adapted_layers(model)  # type: ignore[assignment]  # load_state_dict restores their ranks
        self.total_rank = sum(layer.n_active for layer in self._layers.values())
        n_layers = len(self._layers)
        self.budget = self.target_total_rank if self.target_total_rank is not None else self.target_rank * n_layers
        if self.budget < self.total_rank:
            raise ValueError(f"IncreLoRA: the rank budget {self.budget} is below the initial total rank "
                             f"{self.total_rank}; raise method.target_total_rank or method.target_rank")
        self.ema = {name: [0.0, 0.0] for name in self._layers}
        self._set_tracking(self._layers)
        return model

    def layer_trainable(self, base: nn.Linear) -> int:
        m, n = base.out_features, base.in_features
        reserve = self.incre_rank_num * (m + n) if self.advance_learn else 0  # pre-trained a, b; e frozen
        return self.init_rank * (m + n + 1) + reserve  # active a, b, e + reserve

    @property
    def growing(self) -> bool:
        return self.total_rank < self.budget

    def _set_tracking(self, layers: dict[str, Any]) -> None:
        for layer in layers.values():
            layer.track = self.growing

    # ---------------------------------------------------------------------------------- optimisation
    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """orth_reg_weight × mean over layers of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (all components stacked)."""
        if self.orth_reg_weight == 0:
            return None
        terms = []
        for layer in self.adapted_layers(model).values():
            a, b, _ = layer.stacked()  # type: ignore[operator]  # (k, n), (m, k)
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)  # (k, k)
            terms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
        return self.orth_reg_weight * torch.stack(terms).mean()

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        if not self.growing:
            return
        for name, layer in self.adapted_layers(model).items():
            score = layer.take_score()  # type: ignore[operator]
            if score is None:
                continue
            avg, unc = self.ema[name]
            avg = self.beta1 * avg + (1 - self.beta1) * score  # sensitivity
            unc = self.beta2 * unc + (1 - self.beta2) * abs(score - avg)  # uncertainty
            self.ema[name] = [avg, unc]

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if not self.growing or step <= self.init_warmup or step % self.incre_interval:
            return False
        self.grow(model, optimizer)
        return True  # new parameters: the loop rebuilds the optimizer

    def grow(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Give the top_h layers by Ī·Ū their reserve (within the budget); {layer: components gained}.

        With preserve_output_on_growth, e of a grown layer's components (the joining reserve included) is multiplied
        by ρ_new/ρ_old, and their moments in `optimizer` (when given) are re-expressed in the new units."""
        layers: dict[str, IncreLoRALinear] = self.adapted_layers(model)  # type: ignore[assignment]
        score = {name: self.ema[name][0] * self.ema[name][1] for name in layers}
        order = sorted(layers, key=lambda name: -score[name])  # stable: ties keep the layer order
        grown: dict[str, int] = {}
        for name in order[:self.top_h]:
            k = min(self.incre_rank_num, self.budget - self.total_rank)
            if k <= 0:
                break
            layer, rho = layers[name], layers[name].n_active
            layer.activate(k)
            if self.preserve_output_on_growth:  # (α/ρ_new)·(ρ_new/ρ_old)·e_i = (α/ρ_old)·e_i: ΔW unchanged
                rescale_in_place(list(layer.E)[:layer.n_active], layer.n_active / rho, optimizer)
            self._draw(layer, k, active=False)  # a fresh reserve
            self.total_rank += k
            grown[name] = k
        if not self.growing:  # budget spent: the reserve has no further use
            for layer in layers.values():
                layer.truncate(layer.n_active)
        self._set_tracking(layers)
        return grown

    # ---------------------------------------------------------------------------------- after training
    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.n_active for name, layer in self.adapted_layers(model).items()}  # type: ignore[misc]

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        return rank_summary("increlora", self.ranks(model).values())

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Generator, budget spent, importance EMAs, and each layer's structure with its frozen tensors."""
        layers = {}
        for name, layer in self._layers.items():
            frozen = {f"{kind}.{i}": p.detach().to("cpu").clone()
                      for kind in ("A", "B", "E") for i, p in enumerate(getattr(layer, kind)) if not p.requires_grad}
            layers[name] = {"n_components": layer.n_components, "n_active": layer.n_active, "frozen": frozen}
        return {"generator": self._generator.get_state(), "total_rank": self.total_rank,
                "ema": {k: list(v) for k, v in self.ema.items()}, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ranks of the layers wrapped by wrap() (before the trainable tensors are loaded into them)."""
        if not state:
            return
        self._generator.set_state(state["generator"])
        self.total_rank = int(state["total_rank"])
        self.ema = {k: [float(v[0]), float(v[1])] for k, v in state["ema"].items()}
        for name, spec in state["layers"].items():
            layer = self._layers[name]
            if (layer.n_components, layer.n_active) != (spec["n_components"], spec["n_active"]):
                self._reshape(layer, int(spec["n_components"]), int(spec["n_active"]))
            with torch.no_grad():
                for key, value in spec["frozen"].items():
                    kind, i = key.split(".")
                    getattr(layer, kind)[int(i)].copy_(value)
        self._set_tracking(self._layers)

    def _reshape(self, layer: IncreLoRALinear, n_components: int, n_active: int) -> None:
        """Give `layer` n_components components (values are placeholders, overwritten by the loaded state)."""
        layer.truncate(0)
        layer.n_active = 0
        zeros_a, zeros_b = torch.zeros(1, layer.in_features), torch.zeros(layer.out_features, 1)
        for i in range(n_components):
            if i < n_active:
                layer.append(zeros_a, zeros_b, 0.0, train_ab=True, train_e=True)
            else:
                e = self.reserve_e if self.advance_learn else 0.0
                layer.append(zeros_a, zeros_b, e, train_ab=self.advance_learn, train_e=False)
        layer.n_active = n_active
