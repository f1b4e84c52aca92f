"""SaRA: fine-tune only the small-magnitude ("temporarily ineffective") entries of each weight, as a flat vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from methods.base import Batch, WrapContext
from methods.swap import AdaptedLinear, SwapMethod


class SaRALinear(AdaptedLinear):
    """W' = W0 with the entries at `index` (those with |W0| < τ) replaced by the trainable vector `values`.

    The trainable entries live in their own flat parameter (k,), scattered into a copy of W0 at every forward, so the
    other m·n − k entries are W0's own values, bit for bit, whatever the optimizer does, and the parameter count and
    the saved adapter are exactly the k selected entries. `index` is recomputed from W0 and τ when a fresh copy of the
    base is wrapped, so it is a non-persistent buffer.
    """

    def __init__(self, base: nn.Linear, threshold: float) -> None:
        super().__init__(base)
        flat = base.weight.detach().reshape(-1)  # (m·n,)
        self.register_buffer("index", torch.nonzero(flat.abs() < threshold).squeeze(1), persistent=False)  # (k,)
        self.values = nn.Parameter(flat[self.index].clone())  # (k,) starts at W0's entries: the model is the base

    def weight(self) -> torch.Tensor:
        flat = self.base.weight.reshape(-1).index_put((self.index,), self.values)  # (m·n,)
        return flat.view_as(self.base.weight)  # (m, n)

    def sparse_matrix(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """W ⊙ M (m×n): the trainable entries at their current values (only the `active` ones), zeros elsewhere."""
        values = self.values if active is None else self.values * active  # (k,)
        flat = self.base.weight.new_zeros(self.base.weight.numel()).index_put((self.index,), values)  # (m·n,)
        return flat.view_as(self.base.weight)  # (m, n)


def nuclear_norm(matrix: torch.Tensor) -> torch.Tensor:
    """‖X‖_* = Σ σ_i(X), in fp32 whatever the autocast context (its gradient U·Vᵀ is stable for any spectrum)."""
    with torch.autocast(matrix.device.type, enabled=False):
        return torch.linalg.svdvals(matrix.float()).sum()


class SaRA(SwapMethod):
    """SaRA: train only the entries of W0 with |w| < τ (W' = W0 + P, P sparse on the mask M = {|W0| < τ}),
    with loss += λ·‖W' ⊙ M‖_* on one randomly drawn layer per step, and the mask narrowed once, at step T, to the
    entries that are still below τ.

    Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation",
    arXiv 2409.06633; reference sjtuplayer/SaRA @ ea21192477eb07f11f0fa202108e8c07873d91b9 (optim/adamw.py, the
    default "unstructured backpropagation" optimizer, and optim/adamw2.py, its masked-gradient variant;
    finetune.sh: threshold 2e-3, progressive_iter 2500 of max_train_steps 5005, lambda_rank 5e-4).

    - Mask: an absolute threshold, |w| < τ, as in the reference (not a percentile). The selected entries of each
      target Linear weight are a flat trainable vector scattered into W (SaRALinear); the task head trains in full,
      everything else is frozen.
    - Low-rank term: at each optimizer step one layer is drawn uniformly (a seeded generator; its state is part of
      state_dict) among the target layers with min(m, n) > rank_min_dim (the reference's 64), and
      λ·‖W ⊙ M‖_* — the nuclear norm of the m×n matrix holding the current trainable entries and zeros elsewhere —
      is added to the loss (extra_loss).
    - Progressive adjustment: after T = round(progressive_ratio·total_steps) optimizer steps (the reference's 2500
      of 5005), the mask becomes {|w| < τ} on the current weights. Entries outside the first mask never moved, so
      the new mask is the old one minus the entries that have grown past τ; those are frozen from then on at their
      trained values. The parameter tensors do not change (their size stays the first mask's k, which is also what
      the saved adapter must hold: every entry that differs from W0), so the optimizer is not rebuilt; instead the
      dropped entries' gradients are zeroed after every backward (on_after_backward) and their optimizer state
      (Adam moments) is zeroed at the update (on_step_end), which makes every later AdamW step on them exactly 0.
      The surviving entries keep their state.

    Where this differs from the reference:
    - The reference masks every parameter tensor of the model (biases, norms, convolutions); here the weights of
      the target Linear layers only, as every method of the benchmark adapts the same layers.
    - The reference's default optimizer (adamw.py) writes |w| instead of w into the selected entries before the
      first step (`trainable_params[i].abs()`), so its model does not start at the base; here it does.
    - In the reference's adamw.py the nuclear norm is taken on the original nn.Parameter, which is no longer in
      the autograd graph of the trainable vectors, so the term has no effect on training; here its gradient reaches
      the trainable entries (the paper's intent; adamw2.py's masked-gradient variant also applies it). The
      reference adds it inside optimizer.step(), after gradient clipping; here it is part of the loss, so it is
      clipped with the task gradient and shows in the logged loss.
    - At the mask update the reference's adamw.py re-creates its optimizer (all Adam state lost) and skips that
      step's update; here the surviving entries keep their state and no step is skipped (as in adamw2.py).
    - The sparse entries get no weight decay (the harness decays matrices only; they are a vector to it); the
      reference applies AdamW's 1e-2 to them. The harness's default weight_decay is 0.
    - The reference's default lr is 1e-3·exp(−350·τ) (≈ 5e-4 at τ = 2e-3); here lr is an explicit argument.

    Args:
        lr: learning rate of the sparse entries and the head.
        target_modules: module-name suffixes whose Linear weights are sparsely fine-tuned.
        threshold: τ; the entries with |w| < τ are trainable.
        lambda_rank: λ, the weight of the nuclear-norm term (0 disables it).
        rank_min_dim: only layers with min(m, n) > rank_min_dim are drawn for the nuclear-norm term.
        progressive_ratio: the mask update happens after round(progressive_ratio·total_steps) steps; null: never.
        total_steps: the run's optimizer steps (the YAML interpolates train.max_steps).
    """

    family = "sparse"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        threshold: float = 2e-3,
        lambda_rank: float = 5e-4,
        rank_min_dim: int = 64,
        progressive_ratio: float | None = 0.5,
        total_steps: int = 5005,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if not threshold > 0:
            raise ValueError(f"SaRA threshold must be > 0, got {threshold}")
        if lambda_rank < 0 or rank_min_dim < 0:
            raise ValueError(f"need lambda_rank >= 0 and rank_min_dim >= 0, got {lambda_rank}, {rank_min_dim}")
        if progressive_ratio is not None and not 0.0 < progressive_ratio <= 1.0:
            raise ValueError(f"progressive_ratio must be in (0, 1] or null, got {progressive_ratio}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.threshold, self.lambda_rank, self.rank_min_dim = float(threshold), float(lambda_rank), int(rank_min_dim)
        self.progressive_step = None if progressive_ratio is None else max(1, round(progressive_ratio * total_steps))
        self._active: dict[str, torch.Tensor] = {}  # {layer: (k,) bool}, set at the mask update
        self._generator = torch.Generator()
        self._rank_layer: str | None = None  # the layer drawn for this step's nuclear-norm term

    # --------------------------------------------------------------------------------------- setup
    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> SaRALinear:
        return SaRALinear(base, self.threshold)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._generator.manual_seed(ctx.seed)
        self._active, self._rank_layer = {}, None
        return super().wrap(model, ctx)

    def layer_trainable(self, base: nn.Linear) -> int:
        return int((base.weight.detach().abs() < self.threshold).sum())  # the entries of the mask M

    def rank_layers(self, model: nn.Module) -> list[str]:
        """The layers the nuclear-norm term is drawn from (sorted names: the draw does not depend on module order)."""
        return sorted(n for n, layer in self.adapted_layers(model).items()
                      if min(layer.in_features, layer.out_features) > self.rank_min_dim)

    # -------------------------------------------------------------------------------------- training
    def on_step_begin(self, model: nn.Module, step: int) -> None:
        candidates = self.rank_layers(model) if self.lambda_rank > 0 else []
        if candidates:
            draw = int(torch.randint(len(candidates), (1,), generator=self._generator))
            self._rank_layer = candidates[draw]
        else:
            self._rank_layer = None

    def active_mask(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The layer's current mask over its k entries, on `device` (None before the update: all active)."""
        mask = self._active.get(name)
        if mask is not None and mask.device != device:
            mask = self._active[name] = mask.to(device)
        return mask

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if self._rank_layer is None:
            return None
        layer = model.get_submodule(self._rank_layer)
        assert isinstance(layer, SaRALinear)
        active = self.active_mask(self._rank_layer, layer.values.device)
        return self.lambda_rank * nuclear_norm(layer.sparse_matrix(active))

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        """After the mask update, the entries that left it get no gradient (so clipping ignores them too)."""
        if not self._active:
            return
        for name, layer in self.adapted_layers(model).items():
            if layer.values.grad is not None:
                layer.values.grad.masked_fill_(~self.active_mask(name, layer.values.device), 0.0)

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if self.progressive_step is None or step + 1 != self.progressive_step or self._active:
            return False
        with torch.no_grad():
            for name, layer in self.adapted_layers(model).items():
                keep = layer.values.abs() < self.threshold  # (k,) still "ineffective": keeps training
                self._active[name] = keep
                for value in optimizer.state.get(layer.values, {}).values():
                    if torch.is_tensor(value) and value.shape == keep.shape:
                        value.masked_fill_(~keep, 0)  # Adam moments of the dropped entries: their steps become 0
        return False  # same parameter tensors: nothing to rebuild

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"active": {n: m.cpu() for n, m in self._active.items()}, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._active = {n: m.bool() for n, m in state["active"].items()}
        self._generator.set_state(state["generator"])
