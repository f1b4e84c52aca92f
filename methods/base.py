"""The method plugin contract.

A method changes how the weight update ΔW is parameterised, initialised or optimised. The runner
(bench/run.py) and the loop (bench/train.py) call only the hooks below, in this order, and never name a
method:

    prepare(model, ctx)                  snapshot W0 of the target layers, then wrap()
      wrap(model, ctx)                   freeze, swap modules, weight-only inits (SVD, LU, ...)
    calibrate(model, batches, loss_fn)   data-dependent inits (gradient estimates, activations)
    make_optimizer(model, optim)         AdamW over param_groups() unless the method brings its own
    per step:
      on_step_begin(model, step)
      loss + extra_loss(model, batch, outputs), backward
      on_after_backward(model, step)    gradient surgery (projections, scaling, masks)
      optimizer.step()
      on_step_end(model, step, optimizer) -> True asks the loop to rebuild the optimizer
                                         (the trainable set changed: rank growth, pruning, layer sampling)
    post_train(model, ctx)               compensation, pruning; returns extra metrics (ctx.evaluate scores
                                         intermediate models); the final evaluation runs after it
    merge(model)                         a plain model with ΔW folded in
    delta_weights(model)                 {layer name: ΔW} for analysis and export
    trainable_parameters(model)          what counts as trained (for parameter counts and saving)
    expected_trainable(model, ctx)       the method's own formula for that count, checked by the tests
    state_dict() / load_state_dict()     the method's own non-parameter state (masks, gates, schedules)

A method is configured by conf/method/<name>.yaml: `_target_` names the class and every other key is a
constructor argument. The option name is the file name; there is no other registry.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class WrapContext:
    """What a method may know about the run when it wraps the model.

    Args:
        head_modules: names of modules that every method trains in full because the task added them
            (e.g. the classifier of a sequence-classification model). They are never adapted.
        seed: the run's seed, for methods that draw random bases.
        extra: task- or model-specific information a method may use (free-form).
        evaluate: the task's evaluation on its eval split, {metric: value} (set by the runner; None in unit tests
            that build a context by hand). Post-training methods score intermediate models with it (EoRA: base,
            compressed, compensated; DyLoRA: each inference rank).
        main_metric: the metric `evaluate` ranks by.
        train_batches: a fresh iterator over training batches on the run's device, in a seeded order (set by the
            runner): for compensation fine-tuning after training and for searches that need a held-out split.
        loss_fn: the task loss of a batch, `loss_fn(model, batch)`.
        max_steps: the run's optimizer steps (schedules that are fractions of training: LaMDA, TriAdaptLoRA).
    """

    head_modules: list[str] = field(default_factory=list)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    main_metric: str | None = None
    train_batches: Callable[[], Iterator[Batch]] | None = None
    loss_fn: LossFn | None = None
    max_steps: int | None = None


#: Method families, in the order the catalogue lists them: family -> what its members have in common.
FAMILIES: dict[str, str] = {
    "full": "every weight trained; the reference point",
    "low-rank adapter": "a trained low-rank (or structured) update added to frozen weights",
    "adapter initialisation": "LoRA started from factors of the weights or of their gradient instead of B = 0",
    "rank allocation": "the adapter's rank changes during training or differs per layer, token or step",
    "random bases": "frozen random bases shared across layers, only small coefficients trained",
    "singular values": "the weights' own singular vectors kept, their spectrum (or a factor of it) trained",
    "sparse": "a fixed sparse subset of the weights' entries trained",
    "optimizer": "the optimizer changed (projected or equivalent-gradient Adam), the model's weights or adapters "
                 "trained through it",
    "layer selection": "whole blocks unfrozen a few at a time, the rest frozen",
    "compression": "the base compressed (quantised or low-rank), the adapter recovering what it lost",
    "peft config": "any tuner of Hugging Face PEFT, from its own config",
}


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's suffix rule: `targets` entries match the last component(s) of a module name."""
    return any(name == t or name.endswith("." + t) for t in targets)


class Method:
    """Base class of every method: the hooks, with defaults that do nothing.

    Args:
        lr: learning rate of the method's trainable parameters.
        target_modules: module-name suffixes of the layers the method adapts (PEFT's matching rule). For
            full fine-tuning, the layers whose ΔW is recorded for analysis.
    """

    #: layer types the method can adapt; anything else named by target_modules is an error
    supported_layers: tuple[type[nn.Module], ...] = (nn.Linear,)
    #: False when the spec says the adapted model does not start at the base model (e.g. LoRA-SB)
    init_equals_base: bool = True
    #: False when the update depends on the input (routers, gates): no merge, no ΔW
    mergeable: bool = True
    #: True, or the reason the method cannot train under train.compile=true (torch.compile of the model's forward)
    compilable: bool | str = True
    #: True when post_train turns the trained model into a different one that is scored and exported (LoRAM's
    #: recovery from the pruned model): the shared checklist then runs post_train before its merge and ΔW checks
    rebuilds_in_post_train: bool = False
    #: what kind of method this is: a key of FAMILIES (the method catalogue, docs/methods.md, groups by it)
    family: str = "low-rank adapter"
    #: task head kinds (bench.models.LOADERS) the method cannot train, each with the reason its error gives
    unsupported_heads: ClassVar[dict[str, str]] = {}

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense")) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.target_modules = list(target_modules)
        self._w0: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------- setup
    def target_layers(self, model: nn.Module, ctx: WrapContext) -> dict[str, nn.Module]:
        """The layers this method adapts: every module whose name matches target_modules, minus heads."""
        found = {
            name: module
            for name, module in model.named_modules()
            if name and _matches(name, self.target_modules)
            and not any(name == h or name.startswith(h + ".") for h in ctx.head_modules)
        }
        if not found:
            raise ValueError(
                f"{type(self).__name__}: target_modules={self.target_modules} match no module of "
                f"{type(model).__name__}; set method.target_modules to names from model.named_modules()"
            )
        for name, module in found.items():
            if not isinstance(module, self.supported_layers):
                kinds = ", ".join(t.__name__ for t in self.supported_layers)
                raise TypeError(
                    f"{type(self).__name__} cannot adapt layer '{name}' of type {type(module).__name__}; "
                    f"it supports {kinds}. Narrow method.target_modules."
                )
        return found

    def prepare(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        """Snapshot W0 of the target layers (kept on the CPU, for delta_weights), then wrap."""
        self._w0 = {
            name: module.weight.detach().to("cpu", torch.float32, copy=True)
            for name, module in self.target_layers(model, ctx).items()
        }
        return self.wrap(model, ctx)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        """Freeze the base, add the method's parameters; return the model to train."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        """Data-dependent initialisation from a few training batches. Default: nothing."""

    # ---------------------------------------------------------------------------------- optimisation
    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on vectors (biases, norms, gates, scales)."""
        params = self.trainable_parameters(model).values()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        groups = self.param_groups(model, weight_decay)
        if not groups:
            raise RuntimeError(f"{type(self).__name__} left no trainable parameter in the model")
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_cuda for p in params) or None  # the fused CUDA kernel on a GPU; the CPU keeps torch's default
        return torch.optim.AdamW(groups, lr=self.lr, betas=betas, eps=eps, fused=fused)

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        """A regulariser added to the task loss. Default: none."""
        return None

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the step's forward passes (schedules, layer sampling)."""

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        """After backward, before clipping and the optimizer step (gradient surgery)."""

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """After the optimizer step. Return True when the trainable set changed and the loop must rebuild
        the optimizer (state is carried over for parameters that survive)."""
        return False

    def continue_stage(self, model: nn.Module) -> dict[str, Any]:
        """A continual-learning stage starts (train.init_from): the previous stage's tensors are loaded into `model`.
        A method that trains each task with a fresh adapter (CoDyRA) folds the loaded one away here, leaving ΔW as
        it is. Returns what the record says of it. Default: nothing, training continues the loaded tensors."""
        return {}

    # ---------------------------------------------------------------------------------- after training
    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        """Post-training steps (compensation, pruning). Returns extra metrics for the record."""
        return {}

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain model (no adapter modules) with ΔW folded into the weights. May modify `model`."""
        raise NotImplementedError

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{layer name: ΔW} in fp32 on the CPU: merged weight minus the snapshot taken in prepare().

        This fallback inherits the rounding noise of an fp32 merge (≈1e-7·|W0|), which shows up as a noise floor
        in spectral analyses; methods with a closed form for ΔW override it and compute it in float64.
        """
        merged = self.merge(copy.deepcopy(model))
        return {
            name: merged.get_submodule(name).weight.detach().to("cpu", torch.float32) - w0
            for name, w0 in self._w0.items()
        }

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        """The trainable-parameter count the method's formula predicts for the unwrapped `model`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- state
    def saved_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What a trained run (and a checkpoint) saves: the trainable tensors (adapter and heads). A method whose
        frozen tensors change during training (re-factored bases, blocks trained in earlier periods) adds them."""
        return self.trainable_parameters(model)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").contiguous() for n, p in self.saved_parameters(model).items()}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = self.saved_parameters(model)
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"adapter state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        """The method's own non-parameter state (for checkpoints). Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load, got keys {sorted(state)}")


def rank_summary(prefix: str, ranks: Iterable[int]) -> dict[str, float]:
    """The record's summary of per-layer ranks after training: `<prefix>_total_rank`, `_rank_per_layer_min`, `_max`."""
    ranks = list(ranks)
    return {f"{prefix}_total_rank": float(sum(ranks)), f"{prefix}_rank_per_layer_min": float(min(ranks)),
            f"{prefix}_rank_per_layer_max": float(max(ranks))}


def head_parameter_count(model: nn.Module, ctx: WrapContext) -> int:
    """Parameters of the task heads, which every method trains in full."""
    return sum(p.numel() for h in ctx.head_modules for p in model.get_submodule(h).parameters())
