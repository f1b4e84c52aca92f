"""DyLoRA: one LoRA trained so that every leading sub-rank b ≤ r_max works at inference (nested dropout over the
rank components); a run reports its score at several inference ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.structured_lora import stable_seed
from methods.swap import AdaptedLinear, SwapMethod


class DyLoRALinear(AdaptedLinear):
    """y = W0·x + (α/b)·B[:, :b]·A[:b]·x, with A (r_max×n) and B (m×r_max) trainable.

    In training mode b is `train_rank` (the rank the method sampled for this step); in eval mode, and in delta()
    and merge(), b is `infer_rank`. With `frozen`, the components below b enter the training forward detached, so
    only component b gets a gradient; the components above b never enter the forward at all.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, frozen: bool,
                 generator: torch.Generator) -> None:
        super().__init__(base)
        self.r, self.alpha, self.frozen = int(r), float(alpha), bool(frozen)
        w = base.weight
        a = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # LoRA's A init, U(±1/√n)
        self.A = nn.Parameter(a.to(w.device, w.dtype))  # (r, n)
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (m, r) zero: init == base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train_rank = self.r  # b of the current training step (set by DyLoRA.on_step_begin)
        self.infer_rank = self.r  # b used in eval mode, by delta() and by merge()

    def factors(self, b: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B[:, :b], A[:b]); in frozen training mode the components below b are detached."""
        a, bm = self.A[:b], self.B[:, :b]  # (b, n), (m, b)
        if training and self.frozen and b > 1:
            a = torch.cat([a[:b - 1].detach(), a[b - 1:]], dim=0)  # (b, n)
            bm = torch.cat([bm[:, :b - 1].detach(), bm[:, b - 1:]], dim=1)  # (m, b)
        return bm, a

    def delta(self) -> torch.Tensor:
        b = self.infer_rank
        bm, a = self.factors(b, training=False)
        return (self.alpha / b) * bm @ a  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.train_rank if self.training else self.infer_rank
        bm, a = self.factors(b, training=self.training)
        z = F.linear(self.dropout(x), a)  # (..., b)
        return self.base(x) + (self.alpha / b) * F.linear(z, bm)  # (..., m)


class DyLoRA(SwapMethod):
    """DyLoRA: each training step samples b ~ U{1, …, r_max}, shared by every layer, and trains the truncated LoRA
    y = W0·x + (α/b)·B[:, :b]·A[:b]·x; after training any b ≤ r_max can be used for inference.

    Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
    Adaptation", EACL 2023, arXiv 2210.07558. The authors' code (huawei-noah/KD-NLP, DyLoRA) is not in the public
    snapshot available to us: this follows the paper and specs/methods.md.

    - Init as LoRA: A kaiming-uniform(a=√5), B = 0, so the adapted model starts at the base model.
    - The rank b is drawn from a torch generator seeded by the run's seed; its state is part of state_dict(), so a
      resumed run draws the same sequence as an uninterrupted one.
    - `frozen: true` is the paper's "frozen" mode: components 1..b−1 are used but detached, only component b is
      updated. The default updates all of 1..b (the paper's other mode). In both modes the components above b take no
      gradient; AdamW's moments (and weight decay) still move them on steps where they got none, as with any optimizer
      over the full A and B.
    - post_train() scores the trained model at every rank in `eval_ranks` with the task's evaluation and returns
      {"<main metric>@r=<b>": value}; the model is then left at `inference_rank` (default r_max), which the final
      evaluation, merge() and delta_weights() use.

    Args:
        lr: learning rate (AdamW).
        target_modules: module-name suffixes to adapt.
        r: r_max, the largest rank (the number of components of A and B).
        alpha: scaling numerator; the update at rank b is scaled by alpha / b.
        dropout: dropout on the adapter input.
        frozen: train only component b each step (the paper's frozen mode).
        eval_ranks: inference ranks scored in post_train.
        inference_rank: the rank of the final model (evaluation, merge, ΔW); None: r.
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        frozen: bool = False,
        eval_ranks: Sequence[int] = (1, 2, 4, 8),
        inference_rank: int | None = None,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"DyLoRA rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        bad = [b for b in eval_ranks if not 1 <= int(b) <= r]
        if bad:
            raise ValueError(f"method.eval_ranks must lie in 1..r={r}; got {bad}")
        if inference_rank is not None and not 1 <= inference_rank <= r:
            raise ValueError(f"method.inference_rank must lie in 1..r={r} or be null; got {inference_rank}")
        self.r, self.alpha, self.dropout, self.frozen = int(r), float(alpha), float(dropout), bool(frozen)
        self.eval_ranks = [int(b) for b in eval_ranks]
        self.inference_rank = int(inference_rank) if inference_rank is not None else self.r
        self.b = self.r  # the rank of the latest training step
        self._generator = torch.Generator()

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "dylora", name))
        layer = DyLoRALinear(base, self.r, self.alpha, self.dropout, self.frozen, generator)
        layer.infer_rank = self.inference_rank
        return layer

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._generator = torch.Generator().manual_seed(stable_seed(ctx.seed, "dylora", "rank-sampler"))
        return super().wrap(model, ctx)

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.r * (base.in_features + base.out_features)  # A (r×n) + B (m×r)

    # ---------------------------------------------------------------------------------- rank control
    def set_train_rank(self, model: nn.Module, b: int) -> None:
        for layer in self.adapted_layers(model).values():
            layer.train_rank = b  # type: ignore[assignment]
        self.b = b

    def set_inference_rank(self, model: nn.Module, b: int) -> None:
        """Evaluate, merge and report ΔW at rank b from now on."""
        if not 1 <= b <= self.r:
            raise ValueError(f"DyLoRA inference rank must lie in 1..r={self.r}, got {b}")
        for layer in self.adapted_layers(model).values():
            layer.infer_rank = b  # type: ignore[assignment]

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        b = int(torch.randint(1, self.r + 1, (1,), generator=self._generator))  # b ~ U{1..r_max}
        self.set_train_rank(model, b)

    # ---------------------------------------------------------------------------------- after training
    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        """The score at every rank of eval_ranks; the model is left at inference_rank."""
        if ctx.evaluate is None:
            return {}
        out: dict[str, float] = {}
        try:
            for b in self.eval_ranks:
                self.set_inference_rank(model, b)
                metrics = ctx.evaluate(model)
                names = [ctx.main_metric] if ctx.main_metric is not None else list(metrics)
                out.update({f"{name}@r={b}": float(metrics[name]) for name in names})
        finally:
            self.set_inference_rank(model, self.inference_rank)
        return out

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "b": self.b}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._generator.set_state(state["generator"])
        self.b = int(state["b"])
