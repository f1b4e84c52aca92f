"""CoDyRA: continual learning with LoRA of adaptively minimised rank. Each task trains a fresh gated LoRA whose rank
gates are driven to zero by a scheduled soft threshold; at the next task the surviving components are folded into
the frozen weights and a new gated LoRA starts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.sora import SoRALinear, soft_threshold
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod


class CoDyRALinear(SoRALinear):
    """y = W0·x + B_old·(A_old·x) + s·B·(g ⊙ A·x): the current task's gated LoRA (A r×n, B m×r, g (r,), trainable)
    on top of the frozen components that earlier tasks kept (A_old c×n, B_old m×c, c = r·max_stages slots).

    ΔW = B_old·A_old + s·B·diag(g)·A. A slot of the store is free while its row of A_old is zero (a folded row of A
    is never all zero: A starts kaiming-uniform); the filled slots come first, so only those `used` enter forward.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator,
                 capacity: int) -> None:
        super().__init__(base, r, alpha, dropout, generator)
        w = base.weight
        self.A_old = nn.Parameter(torch.zeros(capacity, self.in_features, device=w.device, dtype=w.dtype),
                                  requires_grad=False)  # (c, n) frozen: earlier tasks' kept components
        self.B_old = nn.Parameter(torch.zeros(self.out_features, capacity, device=w.device, dtype=w.dtype),
                                  requires_grad=False)  # (m, c)
        self.used = 0

    def refresh(self) -> None:
        """Recount the filled slots after A_old was loaded (a continual stage, a checkpoint)."""
        filled = self.A_old.detach().abs().sum(dim=1) > 0  # (c,)
        self.used = int(filled.sum())
        if self.used and not bool(filled[: self.used].all()):
            raise ValueError("CoDyRA: the filled slots of A_old are not contiguous; the adapter state is corrupt")

    def fold(self, generator: torch.Generator) -> int:
        """Move the components with a non-zero gate into the frozen store (B_old ← s·B_I·diag(g_I), A_old ← A_I),
        then start a new gated LoRA (A kaiming-uniform, B = 0, g ~ N(0, 1)); ΔW is unchanged. Returns |I|."""
        b, a = self.pruned_factors()  # (m, k), (k, n)
        k = b.shape[1]
        if self.used + k > self.A_old.shape[0]:
            raise ValueError(f"CoDyRA: {self.used + k} kept components exceed the store's {self.A_old.shape[0]} "
                             "slots; raise method.max_stages to the number of tasks in the sequence")
        with torch.no_grad():
            self.A_old[self.used:self.used + k].copy_(a)
            self.B_old[:, self.used:self.used + k].copy_(b)
            self.used += k
            fresh = torch.empty(self.r, self.in_features)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            self.A.copy_(fresh)
            self.B.zero_()
            self.gate.copy_(torch.randn(self.r, generator=generator))
        return k

    def delta(self) -> torch.Tensor:
        b, a = self.pruned_factors()
        return self.B_old[:, : self.used] @ self.A_old[: self.used] + b @ a  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # (..., m) W0·x + s·B·(g ⊙ A·x)
        if self.used:
            out = out + F.linear(F.linear(x, self.A_old[: self.used]), self.B_old[:, : self.used])  # (..., m)
        return out


def threshold_at(step: int, max_steps: int, kappa: float, levels: int, dense_ratio: float) -> float:
    """The soft threshold after optimizer step `step` (0-based): 0 through the dense phase (steps ≤
    d = dense_ratio·max_steps), then the values of linspace(0, κ, levels) from the second on, each held for
    (max_steps − d)/levels steps, the last one to the end (the reference's schedule)."""
    dense = dense_ratio * max_steps
    if step <= dense or kappa == 0:
        return 0.0
    width = max((max_steps - dense) / levels, 1.0)  # steps per level
    level = min(levels - 1, int((step - dense) // width) + 1)
    return kappa * level / (levels - 1)


class CoDyRA(SwapMethod):
    """CoDyRA: y = W0·x + B_old·A_old·x + s·B·(g ⊙ A·x); after each AdamW step past the dense phase, the gates take
    the proximal step of λ_t·‖g‖₁, g ← sign(g)·max(|g| − λ_t, 0), with λ_t rising in a staircase to κ; at the start
    of the next task (train.init_from) the components with g_i ≠ 0 are folded into the frozen store and a new gated
    LoRA is trained. Each layer ends every task with its own rank nnz(g).

    Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models
    with Dynamic Rank-Selective LoRA", arXiv 2412.01004; reference Artificer-AI-Lab/CoDyRA @
    c1691e4c4c8a331acaaeb7dfa5e37bcb974cf0c8 (loralib/codyra.py `codyra_Linear`, `increment_task`;
    models/codyra.py `train_model`; main.py defaults).

    As in the reference: A kaiming-uniform(a=√5), B = 0, g ~ N(0, 1), scaling 1 (α = r); one AdamW over A, B, g
    (g without weight decay); the threshold λ is 0 for the first half of training (`dense_ratio` 0.5), then climbs
    through `levels` (50) equal steps of linspace(0, κ) to κ = 7e-4 (`max_threshold`), not multiplied by the lr;
    every gate is thresholded after every step once λ > 0; at a new task the zero-gated components are dropped, the
    kept ones (B scaled by g) merged into the model, and A, B, g re-initialised.

    Where this differs from the reference:
    - The kept components of earlier tasks are a frozen low-rank store (A_old, B_old, `max_stages`·r slots) beside
      W0, not added into W0, so that W0 stays the pretrained weight and ΔW is the whole change since pretraining,
      as every continual stage of the suite records it (bench/run.py start_from). The function is the same.
    - The soft threshold is sign(g)·max(|g| − λ, 0); the reference's three in-place masks zero the gates with
      λ < |g| < 2λ instead of shrinking them (as methods/sora.py describes).
    - AdamW's betas are the loop's (train.*), not the reference's (0.9, 0.9999); the task losses are the suite's
      (the reference trains CLIP's image encoder with a CLIP-style loss over the classes seen so far).
    - Placement: the reference adapts every attention and MLP projection of the encoder; here target_modules, by
      default the model's (every linear layer of MiniLM).

    Args:
        lr: learning rate of A, B and g (AdamW).
        target_modules: module-name suffixes to adapt.
        r: components per layer and task (the reference's `rank`, 16).
        alpha: scaling numerator; s = alpha / r (the reference: s = 1).
        dropout: dropout on the adapter input.
        max_threshold: κ, the threshold the schedule ends at (the reference's `max_kappa`).
        levels: the number of values of linspace(0, κ, levels) the threshold steps through, ≥ 2 (the reference's
            `lambda_num`).
        dense_ratio: the fraction of training before any threshold (the reference's `dense_iters`).
        max_stages: tasks the frozen store has room for (r slots each).
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        max_threshold: float = 7e-4,
        levels: int = 50,
        dense_ratio: float = 0.5,
        max_stages: int = 8,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1 or max_stages < 1:
            raise ValueError(f"CoDyRA needs r >= 1 and max_stages >= 1, got {r}, {max_stages}")
        if levels < 2:
            raise ValueError(f"method.levels counts the values of linspace(0, max_threshold, levels), the first "
                             f"one 0: it must be >= 2, got {levels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if max_threshold < 0 or not 0.0 <= dense_ratio <= 1.0:
            raise ValueError(f"need max_threshold >= 0 and dense_ratio in [0, 1], got {max_threshold}, {dense_ratio}")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.max_threshold, self.levels, self.dense_ratio = float(max_threshold), int(levels), float(dense_ratio)
        self.max_stages = int(max_stages)
        self.max_steps, self.seed = 1, 0

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self.max_steps, self.seed = max(int(ctx.max_steps or 1), 1), int(ctx.seed)  # the schedule's and the folds'
        return super().wrap(model, ctx)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "codyra", name))
        return CoDyRALinear(base, self.r, self.alpha, self.dropout, generator, self.r * self.max_stages)

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.r * (base.in_features + base.out_features) + self.r  # A (r×n) + B (m×r) + gate (r)

    def layers(self, model: nn.Module) -> dict[str, CoDyRALinear]:
        return self.adapted_layers(model)  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------- training
    def threshold(self, step: int) -> float:
        return threshold_at(step, self.max_steps, self.max_threshold, self.levels, self.dense_ratio)

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        lam = self.threshold(step)
        if lam > 0:
            with torch.no_grad():
                for layer in self.layers(model).values():
                    layer.gate.copy_(soft_threshold(layer.gate, lam))
        return False

    # ---------------------------------------------------------------------------------- continual stages
    def continue_stage(self, model: nn.Module) -> dict[str, Any]:
        """A new task: fold each layer's kept components into its frozen store, start new gated LoRAs."""
        kept = {}
        for name, layer in self.layers(model).items():
            layer.refresh()
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "codyra", name, "after", layer.used))
            kept[name] = layer.fold(generator)
        return {"codyra_folded_rank": sum(kept.values())}

    def saved_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        saved = dict(self.trainable_parameters(model))
        for name, layer in self.layers(model).items():
            saved[f"{name}.A_old"], saved[f"{name}.B_old"] = layer.A_old, layer.B_old
        return saved

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(model, state)
        for layer in self.layers(model).values():
            layer.refresh()

    # ---------------------------------------------------------------------------------- after training
    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        layers = list(self.layers(model).values())
        ranks = [int(layer.gate.count_nonzero()) for layer in layers]
        return {
            "codyra_nonzero_gates": float(sum(ranks)),
            "codyra_gate_density": sum(ranks) / (self.r * len(ranks)),
            "codyra_rank_per_layer_min": float(min(ranks)),
            "codyra_rank_per_layer_max": float(max(ranks)),
            "codyra_earlier_rank": float(sum(layer.used for layer in layers)),  # components kept by earlier tasks
        }
