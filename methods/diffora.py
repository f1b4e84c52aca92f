"""DiffoRA: a differentiable search picks which modules get a LoRA, then fine-tuning continues on those."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from methods.base import Batch, LossFn, WrapContext, head_parameter_count
from methods.lora import LoRA, LoraInit

log = logging.getLogger(__name__)


def positions(source: Callable[[], Iterable[Batch]], parity: int,
              on_single: Callable[[], None] | None = None) -> Iterator[Batch]:
    """Endless batches at the positions of one parity (0: even, 1: odd) within each pass over `source()`.

    With a source that repeats its order pass after pass (the runner's seeded loader, a fixed list), the two
    parities are two disjoint, fixed halves of the data: the search's training and validation splits. Data of a
    single batch per pass (a DreamBooth subject's few photos) cannot be split: the odd parity then yields that batch
    too, and `on_single()` is called so that the caller can report it."""
    while True:
        first, found = None, False
        for i, batch in enumerate(source()):
            first = batch if i == 0 else first
            if i % 2 == parity:
                found = True
                yield batch
        if first is None:
            raise ValueError("DiffoRA's search got no training batches")
        if not found:
            if on_single is not None:
                on_single()
            yield first


class DiffoRA(LoRA):
    """DiffoRA: y = W0·x + γ_i·s·B_i·A_i·x per target module i, with γ_i = σ(α_i) during the search and γ_i ∈ {0, 1}
    after it: the top `keep_ratio` modules by σ(α) keep their LoRA (γ = 1), the others lose it (γ = 0).

    Jiang, Wang, Yuan, "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix
    Adaptation" (v2: "... via Differential Module Selection"), arXiv 2502.08905. No reference code was found; this is
    a reconstruction from the abstract (the full text could not be read here) and DARTS (Liu, Simonyan, Yang,
    arXiv 1806.09055), whose first-order bilevel search the paper's "continuous relaxation and discretization with
    weight-sharing" follows.

    - The differential adaptation matrix (DAM): one architecture logit α_i per target module (the matrix of layers ×
      module kinds, flattened), γ_i = σ(α_i), i.e. DARTS' softmax over the two candidate operations {LoRA, none}.
      α = 0 at the start (γ = ½); B = 0 (LoRA's init), so the wrapped model is the base model.
    - Search (calibrate()): `search_steps` rounds (at most train.max_steps) of a weight step and an architecture
      step, first-order DARTS.
      The weight step is AdamW (lr = `lr`, no weight decay) on every trainable weight (LoRA factors and task heads)
      with the loss of a training batch; the architecture step is Adam on α (lr `arch_lr`, β = (0.5, 0.999), weight
      decay `arch_weight_decay`, DARTS' settings) with the loss of a validation batch. Batches come from
      ctx.train_batches() (the runner's seeded loader; in unit tests, the batches calibrate() is given), pass after
      pass: the batches at even positions of a pass are the training split, those at odd positions the validation
      split (data of a single batch per pass cannot be split: both steps then use it, with a warning, and the record
      says "diffora/heldout_split": 0). Fine-tuning afterwards uses all the training data, as the paper's does.
    - Discretisation: keep the k = max(1, round(keep_ratio·N)) modules with the largest σ(α) (ties: module order);
      the others' LoRA is switched off (PEFT's per-layer `enable_adapters(False)`: base output only, factors frozen,
      B zeroed so ΔW = 0).
    - Weight sharing (`inherit_weights: true`): fine-tuning continues from the weights the search trained (LoRA
      factors and heads), each kept module's gate folded into its factor (B ← σ(α)·B) so that its contribution is
      unchanged by the switch. The run then does not start at the base model (init_equals_base is False).
      `inherit_weights: false` resets every weight to its pre-search value: the search only selects modules.

    The search's steps are extra optimizer steps not counted in train.max_steps (2 forward/backward passes each).

    Args (beyond LoRA's):
        search_steps: rounds of (weight step, architecture step).
        keep_ratio: fraction of the target modules that keep a LoRA.
        arch_lr: Adam learning rate of α.
        arch_weight_decay: weight decay of α (DARTS: 1e-3).
        inherit_weights: fine-tune from the searched (shared) weights, or from the initial ones.
    """

    family = "rank allocation"

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: LoraInit = "default",
        use_dora: bool = False,
        use_rslora: bool = False,
        search_steps: int = 50,
        keep_ratio: float = 0.5,
        arch_lr: float = 1e-2,
        arch_weight_decay: float = 1e-3,
        inherit_weights: bool = True,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, init=init,
                         use_dora=use_dora, use_rslora=use_rslora)
        if use_dora or init not in ("default", "gaussian"):
            raise ValueError("DiffoRA gates the LoRA branch, which needs B = 0 at init and no DoRA: "
                             "set method.init=default and method.use_dora=false")
        if search_steps < 1:
            raise ValueError(f"method.search_steps must be >= 1, got {search_steps}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"method.keep_ratio must be in (0, 1], got {keep_ratio}")
        if not arch_lr > 0 or arch_weight_decay < 0:
            raise ValueError(f"need method.arch_lr > 0 and method.arch_weight_decay >= 0, "
                             f"got {arch_lr}, {arch_weight_decay}")
        self.search_steps, self.keep_ratio = int(search_steps), float(keep_ratio)
        self.arch_lr, self.arch_weight_decay = float(arch_lr), float(arch_weight_decay)
        self.inherit_weights = bool(inherit_weights)
        self.init_equals_base = not self.inherit_weights  # the searched weights are where fine-tuning starts
        self.kept: list[str] | None = None  # the modules that keep their LoRA, after the search
        self.scores: dict[str, float] = {}  # σ(α) at the end of the search
        self.search_losses: list[tuple[float, float]] = []  # (training, validation) loss of every round
        self.heldout = True  # False when the data had a single batch per pass: validation = training
        self._source: Callable[[], Iterable[Batch]] | None = None
        self._max_steps: int | None = None
        self.seed = 0

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._source, self.seed, self._max_steps = ctx.train_batches, ctx.seed, ctx.max_steps
        # A's init drawn from the seed: the search, hence the selection, is reproducible (a resumed run re-selects)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return super().wrap(model, ctx)

    def _no_heldout(self) -> None:
        if self.heldout:
            log.warning("DiffoRA: the training data is a single batch per pass, so the search's architecture steps "
                        "use training batches (no held-out split); lower train.batch_size to split it")
        self.heldout = False

    def rounds(self) -> int:
        """search_steps, capped at the run's train.max_steps (a smoke run does not search longer than it trains)."""
        return min(self.search_steps, self._max_steps) if self._max_steps else self.search_steps

    def keep_count(self, n: int) -> int:
        return max(1, round(self.keep_ratio * n))

    # ---------------------------------------------------------------------------------------- search
    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        """The search, the discretisation and the switch to fine-tuning (see the class docstring)."""
        if self._source is not None:
            source = self._source
        else:
            fallback = list(batches)
            source = lambda: iter(fallback)  # noqa: E731
        with torch.random.fork_rng(devices=[]):  # dropout masks: reproducible from the seed
            torch.manual_seed(self.seed)
            alpha = self.search(model, source, loss_fn)
        self.scores = {name: float(torch.sigmoid(a)) for name, a in alpha.items()}
        ranked = sorted(alpha, key=lambda name: -self.scores[name])  # stable: ties keep module order
        top = set(ranked[: self.keep_count(len(ranked))])
        self.kept = [name for name in alpha if name in top]
        if self.inherit_weights:
            layers = self.lora_layers(model)
            with torch.no_grad():
                for name in self.kept:  # fold the gate into B: the kept module's contribution is unchanged
                    layers[name].lora_B["default"].weight.mul_(torch.sigmoid(alpha[name]))
        self.apply_mask(model)

    def search(self, model: nn.Module, source: Callable[[], Iterable[Batch]],
               loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """First-order DARTS over the gates γ = σ(α); returns α. Restores the weights when not inheriting them."""
        layers = self.lora_layers(model)
        device = next(iter(layers.values())).get_base_layer().weight.device
        alpha = {name: torch.zeros((), device=device, requires_grad=True) for name in layers}

        def gate(a: torch.Tensor) -> Callable[..., torch.Tensor]:
            return lambda module, inputs, output: output * torch.sigmoid(a).to(output.dtype)  # γ·B·A·x

        hooks = [layer.lora_B["default"].register_forward_hook(gate(alpha[name])) for name, layer in layers.items()]
        weights = [p for p in model.parameters() if p.requires_grad]  # LoRA factors and task heads: shared
        initial = [p.detach().clone() for p in weights] if not self.inherit_weights else []
        w_opt = torch.optim.AdamW(weights, lr=self.lr, weight_decay=0.0)
        a_opt = torch.optim.Adam(list(alpha.values()), lr=self.arch_lr, betas=(0.5, 0.999),
                                 weight_decay=self.arch_weight_decay)
        train, val = positions(source, 0), positions(source, 1, on_single=self._no_heldout)
        self.search_losses = []
        was_training = model.training
        model.train()
        try:
            for _ in range(self.rounds()):
                losses = []
                for opt, batch in ((w_opt, next(train)), (a_opt, next(val))):
                    w_opt.zero_grad(set_to_none=True)
                    a_opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model, batch)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                self.search_losses.append((losses[0], losses[1]))
        finally:
            for h in hooks:
                h.remove()
            w_opt.zero_grad(set_to_none=True)
            model.train(was_training)
        with torch.no_grad():
            for p, p0 in zip(weights, initial):
                p.copy_(p0)
        return {name: a.detach() for name, a in alpha.items()}

    def apply_mask(self, model: nn.Module) -> None:
        """Kept modules: LoRA on and trainable. Dropped: B = 0, LoRA off (base output only) and frozen."""
        assert self.kept is not None
        for name, layer in self.lora_layers(model).items():
            if name in self.kept:
                layer.enable_adapters(True)
            else:
                with torch.no_grad():
                    layer.lora_B["default"].weight.zero_()
                layer.enable_adapters(False)

    # ---------------------------------------------------------------------------------------- training
    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        if self.kept is None:
            raise RuntimeError("DiffoRA's module search runs in calibrate(); call method.calibrate(model, batches, "
                               "loss_fn) before training")
        return super().make_optimizer(model, weight_decay, betas, eps)

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        """Heads + r(m + n) for every module that keeps its LoRA (every target before the search)."""
        layers = self.target_layers(model, ctx)
        kept = layers if self.kept is None else {n: layers[n] for n in self.kept}
        return head_parameter_count(model, ctx) + sum(self.r * (l.in_features + l.out_features) for l in kept.values())

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        kept = set(self.kept or [])
        dropped = [s for n, s in self.scores.items() if n not in kept]
        out = {"diffora/kept_modules": float(len(kept)), "diffora/modules": float(len(self.scores)),
               "diffora/heldout_split": float(self.heldout),
               "diffora/score_kept_mean": sum(self.scores[n] for n in kept) / max(1, len(kept))}
        if dropped:
            out["diffora/score_dropped_mean"] = sum(dropped) / len(dropped)
        if self.search_losses:
            out["diffora/search_val_loss_first"] = self.search_losses[0][1]
            out["diffora/search_val_loss_last"] = self.search_losses[-1][1]
        return out

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"kept": list(self.kept or []), "scores": dict(self.scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the selection; load_adapter_state_dict() applies it to the model before loading the weights."""
        self.kept, self.scores = list(state["kept"]), dict(state["scores"])

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.kept is not None:
            self.apply_mask(model)
        super().load_adapter_state_dict(model, state)
