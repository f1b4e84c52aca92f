"""AdaLoRA through PEFT: an SVD-shaped update whose singular values are masked, during training, down to a rank
budget allocated across layers by importance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import AdaLoraConfig, PeftModel
from torch import nn

from methods.base import WrapContext, rank_summary
from methods.peft_tuners import PeftTuner

ADAPTER = "default"


class AdaLoRA(PeftTuner):
    """AdaLoRA, through PEFT: ΔW = (α/r)·P·Λ·Q per layer with P (m×r), Λ = diag(E) (r), Q (r×n), r = init_r. After
    every optimizer step the importance of each triplet (P_:i, λ_i, Q_i:) is updated from |w ⊙ ∂L/∂w| (EMA of the
    sensitivity × EMA of its uncertainty, β1 = β2 = 0.85), and on the budget schedule the least important λ_i are set
    to zero until the layers keep target_r × #layers triplets in all.
    Loss += orth_reg_weight · mean over the matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F.

    Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
    arXiv 2303.10512; reference QingruZhang/AdaLoRA @ d10f5ebee16c478fa2f41a44a237b38e8c9b0338
    (loralib/loralib/adalora.py, NLU/scripts/run_debertav3_sst2.sh). Implemented by PEFT's `AdaLoraConfig` / `AdaLoraModel.update_and_allocate` (peft 0.21).

    Schedule (PEFT's, the reference's): budget init_r·L for the first tinit steps, then a cubic decrease to target_r·L
    reached at step T − tfinal, masks every deltaT steps; during the last tfinal steps the final mask is re-applied
    after every step. T is the run's max_steps (WrapContext.max_steps); tinit and tfinal are given as fractions of T so
    that one YAML fits any run length.

    How it is driven here:
    - PEFT's allocator reads p.grad after the optimizer step; the loop zeroes gradients before on_step_end, so
      on_after_backward keeps references to the gradient tensors (the loop's clipping scales them in place, so they
      hold what the optimizer used) and on_step_end puts them back for `update_and_allocate(step)`.
    - A plain PeftModel (no task_type) runs the transformers model directly, so AdaLoraModel.forward never adds the
      orthogonal regulariser: extra_loss() adds it, with PEFT's formula (and PEFT's own weight is set to 0).
    - Masking zeroes λ_i in place; the trainable set does not change, so the optimizer is never rebuilt. A masked λ_i
      keeps receiving AdamW steps until it is masked again (the reference behaves the same).
    - Trainable per layer: P, Λ, Q = init_r·(m + n + 1) (PEFT's `ranknum` is a frozen scalar).

    Args:
        lr: learning rate (AdamW).
        target_modules: module-name suffixes to adapt.
        init_r: initial rank of every layer.
        target_r: average rank per layer at the end of the budget schedule.
        alpha: scaling numerator; the update is scaled by alpha / init_r.
        dropout: dropout on the adapter input.
        tinit_ratio: fraction of the run before the budget starts to decrease.
        tfinal_ratio: fraction of the run at the end with the final budget fixed.
        deltaT: steps between two budget allocations.
        beta1: EMA coefficient of the sensitivity.
        beta2: EMA coefficient of the uncertainty.
        orth_reg_weight: weight of the orthogonal regulariser.
        total_steps: T when the context does not give the run's steps (WrapContext.max_steps wins).
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        init_r: int = 12,
        target_r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        tinit_ratio: float = 0.12,
        tfinal_ratio: float = 0.44,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.1,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if not 1 <= target_r <= init_r:
            raise ValueError(f"need 1 <= method.target_r <= method.init_r, got {target_r}, {init_r}")
        if not (0 <= tinit_ratio and 0 <= tfinal_ratio and tinit_ratio + tfinal_ratio < 1):
            raise ValueError(f"need tinit_ratio, tfinal_ratio >= 0 with a sum below 1 (a budgeting phase); "
                             f"got method.tinit_ratio={tinit_ratio}, method.tfinal_ratio={tfinal_ratio}")
        if deltaT < 1:
            raise ValueError(f"method.deltaT must be >= 1, got {deltaT}")
        if not 0.0 <= dropout < 1.0 or orth_reg_weight < 0:
            raise ValueError(f"need dropout in [0, 1) and orth_reg_weight >= 0, got {dropout}, {orth_reg_weight}")
        self.init_r, self.target_r, self.alpha, self.dropout = int(init_r), int(target_r), float(alpha), float(dropout)
        self.tinit_ratio, self.tfinal_ratio, self.deltaT = float(tinit_ratio), float(tfinal_ratio), int(deltaT)
        self.beta1, self.beta2, self.orth_reg_weight = float(beta1), float(beta2), float(orth_reg_weight)
        self.total_steps = total_steps
        self._peft: PeftModel | None = None
        self._grads: list[tuple[nn.Parameter, torch.Tensor | None]] = []

    def peft_config(self, layer_names: list[str], ctx: WrapContext) -> AdaLoraConfig:
        T = ctx.max_steps if ctx.max_steps is not None else self.total_steps
        if T is None or T < 1:
            raise ValueError("AdaLoRA needs the run's steps: WrapContext.max_steps or method.total_steps")
        tinit, tfinal = round(self.tinit_ratio * T), round(self.tfinal_ratio * T)
        if tinit >= T - tfinal:  # too short a run to round to a budgeting phase: keep at least one step of it
            tinit, tfinal = 0, max(0, min(tfinal, T - 1))
        return AdaLoraConfig(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            tinit=tinit, tfinal=tfinal, deltaT=self.deltaT, beta1=self.beta1, beta2=self.beta2, total_step=int(T),
            orth_reg_weight=0.0,  # added by extra_loss(): a plain PeftModel never calls AdaLoraModel.forward
            target_modules=layer_names, modules_to_save=list(ctx.head_modules) or None,
        )

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._peft = super().wrap(model, ctx)  # type: ignore[assignment]
        return self._peft  # type: ignore[return-value]

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.init_r * (base.in_features + base.out_features + 1)  # Q (r×n) + P (m×r) + Λ (r)

    def lora_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if ("lora_A" in n or "lora_B" in n or "lora_E" in n)
                and ADAPTER in n]

    # ---------------------------------------------------------------------------------- optimisation
    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """PEFT's regulariser: weight × mean over the P and Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F."""
        if self.orth_reg_weight == 0:
            return None
        terms = []
        for n, p in self.lora_parameters(model):
            if "lora_E" in n:
                continue
            cov = p @ p.T if "lora_A" in n else p.T @ p  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        return self.orth_reg_weight * torch.stack(terms).mean()

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        self._grads = [(p, p.grad) for _, p in self.lora_parameters(model)]  # references: clipping scales them in place

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        assert isinstance(model, PeftModel), "on_step_end() expects the model returned by wrap()"
        for p, g in self._grads:
            p.grad = g if g is not None else torch.zeros_like(p)
        try:
            model.base_model.update_and_allocate(step)
        finally:
            for p, _ in self._grads:
                p.grad = None
            self._grads = []
        return False  # masking zeroes singular values in place: the trainable set is unchanged

    # ---------------------------------------------------------------------------------- after training
    def ranks(self, model: nn.Module) -> dict[str, int]:
        """{layer: non-zero singular values}."""
        return {name: int(layer.lora_E[ADAPTER].count_nonzero()) for name, layer in self.tuner_layers(model).items()}

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        return rank_summary("adalora", self.ranks(model).values())

    # ------------------------------------------------------------------------------------- state
    def _allocator(self) -> Any:
        assert self._peft is not None, "wrap() first"
        return self._peft.base_model.rankallocator

    def state_dict(self) -> dict[str, Any]:
        """PEFT's allocator state: the importance EMAs and the rank pattern (the final phase re-applies it)."""
        if self._peft is None:
            return {}
        alloc = self._allocator()

        def cpu(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().to("cpu").clone() for k, v in d.items()}

        pattern = self._peft.peft_config[ADAPTER].rank_pattern
        return {"ipt": cpu(alloc.ipt), "exp_avg_ipt": cpu(alloc.exp_avg_ipt), "exp_avg_unc": cpu(alloc.exp_avg_unc),
                "rank_pattern": {k: [bool(x) for x in v] for k, v in pattern.items()} if pattern else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        alloc = self._allocator()
        device = next(p.device for _, p in self.lora_parameters(self._peft))  # type: ignore[arg-type]
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {k: v.to(device) for k, v in state[key].items()})
        self._peft.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]  # type: ignore[union-attr]
