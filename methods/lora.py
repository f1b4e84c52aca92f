"""LoRA and the variants PEFT implements faithfully (DoRA, PiSSA, OLoRA, rsLoRA) as options of one class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from methods.base import Method, WrapContext, head_parameter_count

LoraInit = Literal["default", "gaussian", "pissa", "olora"]


class LoRA(Method):
    """LoRA, through PEFT: y = W0·x + (α/r)·B·A·x, with B (m×r) and A (r×n) trainable, W0 frozen.

    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685;
    reference microsoft/LoRA. Implemented by PEFT's `LoraConfig` (peft 0.21), which follows the reference:
    A kaiming-uniform(a=√5), B = 0, merge W0 + (α/r)·B·A.

    Variants are YAML files over this class (conf/method/<name>.yaml with `defaults: [lora, _self_]`):

    - DoRA (Liu et al., arXiv 2402.09353; NVlabs/DoRA): `use_dora: true`.
      W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row, m initialised to ‖W0‖_row and trained; the norm is detached.
    - PiSSA (Meng et al., arXiv 2404.02948; GraphPKU/PiSSA): `init: pissa`.
      W0 = U S Vᵀ; B = U_r √S_r, A = √S_r V_rᵀ (PEFT divides S_r by s), frozen residual W0 − sBA.
    - OLoRA (Büyükakyüz, arXiv 2406.01775): `init: olora` (QR of W0).

    Convolutions: plain LoRA and DoRA (init default or gaussian) also adapt nn.Conv2d with groups=1, as PEFT does:
    A is a conv with the layer's kernel to r channels, B a 1×1 conv, so ΔW = s·(B·A) reshaped to (out, in, kh, kw);
    DoRA's norm runs over each output channel's (in, kh, kw) block. PiSSA/OLoRA factor W0 as a matrix and
    subclasses read B·A as matrices: they adapt nn.Linear only (Method.target_layers names any other type).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: rank.
        alpha: scaling numerator; s = alpha / r (alpha / √r with use_rslora).
        dropout: dropout on the adapter's input.
        init: initialisation of A and B: default (B = 0), gaussian, pissa, olora.
        use_dora: weight-decomposed LoRA (DoRA).
        use_rslora: rank-stabilised scaling s = alpha / √r.
    """

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
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if init not in ("default", "gaussian", "pissa", "olora"):
            raise ValueError(f"LoRA init must be one of default, gaussian, pissa, olora; got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.init, self.use_dora, self.use_rslora = init, bool(use_dora), bool(use_rslora)

    @property
    def family(self) -> str:  # type: ignore[override]
        """PiSSA and OLoRA (init from W0's factors) are initialisations; LoRA, DoRA, rsLoRA are adapters."""
        return "adapter initialisation" if self.init in ("pissa", "olora") else "low-rank adapter"

    @property
    def supported_layers(self) -> tuple[type[nn.Module], ...]:  # type: ignore[override]
        """nn.Linear; nn.Conv2d too for this class with PEFT's default or gaussian init (see the class docstring)."""
        conv = type(self) is LoRA and self.init in ("default", "gaussian")
        return (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)

    def peft_config(self, layer_names: list[str], ctx: WrapContext) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=layer_names,  # exact names: the heads are never adapted
            modules_to_save=list(ctx.head_modules) or None,
            init_lora_weights=True if self.init == "default" else self.init,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
        )

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        targets = self.target_layers(model, ctx)
        for name, layer in targets.items():
            if isinstance(layer, nn.Conv2d) and (type(layer) is not nn.Conv2d or layer.groups != 1):
                raise TypeError(f"{type(self).__name__} adapts plain nn.Conv2d with groups=1 only; '{name}' is a "
                                f"{type(layer).__name__} with groups={layer.groups}. Narrow method.target_modules.")
        layers = sorted(targets)
        peft_model = get_peft_model(model, self.peft_config(layers, ctx))
        # the initial product s·B0·A0 (non-zero for pissa/olora, whose residual W0 − s·B0·A0 is frozen)
        self._init_product = self.products(peft_model) if self.init in ("pissa", "olora") else {}
        return peft_model

    def products(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{layer: s·B·A} in float64 on the CPU, shaped like W0; at init, the part an SVD/QR/gradient init moved
        out of W0. A conv's B (out, r, 1, 1) and A (r, in, kh, kw) multiply as matrices (out, r)·(r, in·kh·kw)."""
        out = {}
        for name, layer in self.lora_layers(model).items():
            b = layer.lora_B["default"].weight.detach().double().cpu()  # (m, r) or (m, r, 1, 1)
            a = layer.lora_A["default"].weight.detach().double().cpu()  # (r, n) or (r, n, kh, kw)
            product = layer.scaling["default"] * (b.flatten(1) @ a.flatten(1))  # (m, n·kh·kw)
            out[name] = product if a.ndim == 2 else product.reshape(b.shape[0], *a.shape[1:])  # (m, n[, kh, kw])
        return out

    @staticmethod
    def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
        """{name in the unwrapped model: PEFT LoRA layer}."""
        prefix = "base_model.model."
        return {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW in closed form, in float64 (cast to fp32), free of the rounding noise of a merged fp32 weight.

        LoRA: s·B·A.  PiSSA/OLoRA: s·(B·A − B0·A0).  DoRA: m ⊙ V/‖V‖_row − W0 with V = W0 + s·B·A.
        A conv's ΔW has W0's shape (out, in, kh, kw); its DoRA row is an output channel's (in, kh, kw) block.
        """
        deltas, layers = {}, self.lora_layers(model)
        for name, delta in self.products(model).items():  # s·B·A, shaped like W0
            if name in self._init_product:
                delta = delta - self._init_product[name]
            if self.use_dora:
                w0 = self._w0[name].double()  # (m, n[, kh, kw])
                v = (w0 + delta).flatten(1)  # (m, n·kh·kw)
                magnitude = layers[name].lora_magnitude_vector["default"].weight.detach().double().cpu().flatten()  # (m,)
                delta = (magnitude[:, None] * v / v.norm(dim=1, keepdim=True)).reshape(w0.shape) - w0
            deltas[name] = delta.float()
        return deltas

    def merge(self, model: nn.Module) -> nn.Module:
        assert isinstance(model, PeftModel), "merge() expects the model returned by wrap()"
        return model.merge_and_unload()

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        count = head_parameter_count(model, ctx)
        for layer in self.target_layers(model, ctx).values():
            m, n = layer.weight.shape[0], layer.weight[0].numel()  # a conv's n = in·kh·kw
            count += self.r * (n + m)  # A (r×n) + B (m×r)
            if self.use_dora:
                count += m  # magnitude m
        return count
