"""Full fine-tuning: the reference point every PEFT method is compared with."""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Method, WrapContext


class Full(Method):
    """Full fine-tuning: W = W0 + ΔW with every parameter trainable (AdamW).

    Nothing is frozen and nothing is merged; delta_weights() still reports ΔW = W − W0 for the layers named by
    target_modules, so that spectral and intruder analyses compare full fine-tuning with the low-rank methods
    on the same layers.

    Args:
        lr: learning rate.
        target_modules: the layers whose ΔW is recorded for analysis (training touches all layers).
    """

    family = "full"

    #: ΔW = W − W0 exists for any weight: convolutions are recorded too (as (out, in, kh, kw))
    supported_layers = (nn.Linear, nn.Conv2d)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = W − W0, subtracted in float64 (exact for two fp32 weights)."""
        return {name: (model.get_submodule(name).weight.detach().double().cpu() - w0.double()).float()
                for name, w0 in self._w0.items()}

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        return sum(p.numel() for p in model.parameters())
