"""The base for methods that PEFT does not implement: swap each target Linear for an adapted layer.

An adapted layer holds the frozen pre-trained Linear as `.base` and adds the method's parameters. It answers
two questions — what is the effective weight (`weight()`), and what does the forward compute (`forward`, which
subclasses may factor for speed but must keep equal to `F.linear(x, weight(), bias())`) — and everything else
(merging, ΔW for analysis, parameter counts, saving) follows from them in SwapMethod.

A method of this kind is two small classes:

    class NOLALinear(AdaptedLinear):       # the parameterisation of one layer
        def weight(self): ...              # effective W (m×n)
        def forward(self, x): ...          # optional, cheaper factored form

    class NOLA(SwapMethod):                # the method: hyper-parameters, per-layer count formula, hooks
        def make_layer(self, name, base, ctx): return NOLALinear(base, ...)
        def layer_trainable(self, base): return ...
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, WrapContext, head_parameter_count


class AdaptedLinear(nn.Module):
    """A frozen Linear W0 (m×n) with a method's update. y = x·W'ᵀ + b', with W' = weight(), b' = bias().

    Subclasses add parameters in __init__ and implement `delta()` (ΔW, the default weight() is W0 + ΔW) or
    `weight()` directly when the method reparameterises W0 itself (residual + trainable factors).
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features

    def delta(self) -> torch.Tensor:
        """ΔW (m×n) such that weight() = W0 + ΔW."""
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        return self.base.weight + self.delta()  # (m, n)

    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias())  # (..., m)

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (in W0's dtype; in W''s where a method drops W0)."""
        with torch.no_grad():
            weight, bias = self.weight(), self.bias()
        return linear_from(weight, bias, weight.dtype if self.base.weight is None else self.base.weight.dtype)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> nn.Linear:
    """A new nn.Linear holding copies of `weight` (m×n) and `bias`, on their device, in `dtype` (default theirs)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=dtype or weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `module`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class SwapMethod(Method):
    """A method that replaces every target Linear with `make_layer(...)`; heads train in full, the rest is frozen.

    Subclasses implement make_layer() and layer_trainable() (the per-layer count formula), and any hooks. A method
    that trains the rest of the model in full (SLTrain's pretraining) sets `trains_rest`.
    """

    #: True: every parameter outside the adapted layers' frozen weights trains (not only the heads)
    trains_rest: bool = False

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        raise NotImplementedError

    def layer_trainable(self, base: nn.Linear) -> int:
        """Trainable parameters the method adds to one Linear of this shape (its formula from the paper)."""
        raise NotImplementedError

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        layers = self.target_layers(model, ctx)
        model.requires_grad_(self.trains_rest)
        for name, base in layers.items():
            set_submodule(model, name, self.make_layer(name, base, ctx))
        for head in ctx.head_modules:
            model.get_submodule(head).requires_grad_(True)
        return model

    def adapted_layers(self, model: nn.Module) -> dict[str, AdaptedLinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}

    def merge(self, model: nn.Module) -> nn.Module:
        for name, layer in self.adapted_layers(model).items():
            set_submodule(model, name, layer.merged())
        return model

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = W' − W0, evaluated on a float64 copy of each layer (no fp32 cancellation noise), cast to fp32."""
        out = {}
        with torch.no_grad():
            for name, layer in self.adapted_layers(model).items():
                layer64 = copy.deepcopy(layer).to("cpu", torch.float64)
                out[name] = (layer64.weight() - self._w0[name].double()).float()
        return out

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        return head_parameter_count(model, ctx) + sum(self.layer_trainable(b) for b in self.target_layers(model, ctx).values())


def frozen_random(shape: Sequence[int], generator: torch.Generator, kind: str = "uniform") -> torch.Tensor:
    """A reproducible random tensor on the CPU (for frozen random bases regenerated from a seed)."""
    if kind == "uniform":
        return torch.rand(*shape, generator=generator) * 2 - 1
    if kind == "normal":
        return torch.randn(*shape, generator=generator)
    raise ValueError(f"unknown random kind {kind!r}")
