"""Methods that PEFT implements faithfully as their own tuners: VeRA, RandLoRA, Bone (PEFT's MiSS)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from peft import MissConfig, PeftConfig, PeftModel, RandLoraConfig, VeraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from methods.base import Method, WrapContext, head_parameter_count

PREFIX = "base_model.model."


class PeftTuner(Method):
    """A method wrapped from a PEFT tuner: subclasses give the PEFT config and their per-layer count formula."""

    def peft_config(self, layer_names: list[str], ctx: WrapContext) -> PeftConfig:
        raise NotImplementedError

    def layer_trainable(self, base: nn.Linear) -> int:
        """Trainable parameters the method adds to one Linear of this shape (the paper's formula)."""
        raise NotImplementedError

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        return get_peft_model(model, self.peft_config(sorted(self.target_layers(model, ctx)), ctx))

    def merge(self, model: nn.Module) -> nn.Module:
        assert isinstance(model, PeftModel), "merge() expects the model returned by wrap()"
        return model.merge_and_unload()

    @staticmethod
    def tuner_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
        return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW from PEFT's own merge, run on a float64 copy of each layer (no fp32 cancellation noise)."""
        out = {}
        for name, layer in self.tuner_layers(model).items():
            layer64 = copy.deepcopy(layer).to("cpu", torch.float64)
            layer64.merge()
            out[name] = (layer64.get_base_layer().weight.detach() - self._w0[name].double()).float()
        return out

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        layers = self.target_layers(model, ctx).values()
        return head_parameter_count(model, ctx) + sum(self.layer_trainable(b) for b in layers)


class VeRA(PeftTuner):
    """VeRA, through PEFT: ΔW = Λ_b·B·Λ_d·A, with A (r×n) and B (m×r) frozen random matrices shared by all
    layers (regenerated from a PRNG key, never saved) and only the scaling vectors b ∈ R^m (init 0) and
    d ∈ R^r (init d_initial) trained.

    Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454 (no official code release);
    implemented by PEFT's `VeraConfig` (peft 0.21).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt.
        r: rank of the shared random matrices.
        d_initial: initial value of every entry of d.
        projection_prng_key: seed of the shared random matrices.
        dropout: dropout on the adapter input.
    """

    family = "random bases"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int = 1024, d_initial: float = 0.1, projection_prng_key: int = 0, dropout: float = 0.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"VeRA rank r must be >= 1, got {r}")
        self.r, self.d_initial, self.key, self.dropout = int(r), float(d_initial), int(projection_prng_key), float(dropout)

    def peft_config(self, layer_names: list[str], ctx: WrapContext) -> VeraConfig:
        return VeraConfig(r=self.r, target_modules=layer_names, projection_prng_key=self.key,
                          save_projection=False, d_initial=self.d_initial, vera_dropout=self.dropout,
                          modules_to_save=list(ctx.head_modules) or None)

    def layer_trainable(self, base: nn.Linear) -> int:
        return base.out_features + self.r  # b (m) + d (r)


class RandLoRA(PeftTuner):
    """RandLoRA, through PEFT: ΔW = s·Σ_{i≤N} B_i·diag(λ_i)·A_i·diag(γ_i), N = ⌈min(m,n)/r⌉, full rank.

    The random bases B_i, A_i (rank r each) are frozen and shared across layers (PRNG key); λ (r×N) and
    γ (N×min(m,n)) are trained. s = α/r.

    Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", arXiv 2502.00987;
    reference PaulAlbert31/RandLoRA @ af2ad280f47a1110b045bb8e75fce66fd5d8b78f; implemented by PEFT's `RandLoraConfig` (peft 0.21).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt.
        r: rank of each random basis.
        alpha: scaling numerator, s = alpha / r.
        projection_prng_key: seed of the shared random bases.
        sparse: ternary sparse bases (the paper's sparse variant).
        dropout: dropout on the adapter input.
    """

    family = "random bases"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int = 32, alpha: float = 640.0, projection_prng_key: int = 0, sparse: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"RandLoRA rank r must be >= 1, got {r}")
        self.r, self.alpha, self.key, self.sparse, self.dropout = int(r), float(alpha), int(projection_prng_key), bool(sparse), float(dropout)

    def peft_config(self, layer_names: list[str], ctx: WrapContext) -> RandLoraConfig:
        return RandLoraConfig(r=self.r, randlora_alpha=self.alpha, target_modules=layer_names,
                              projection_prng_key=self.key, save_projection=False, sparse=self.sparse,
                              randlora_dropout=self.dropout, modules_to_save=list(ctx.head_modules) or None)

    def layer_trainable(self, base: nn.Linear) -> int:
        k = min(base.in_features, base.out_features)
        n_bases = -(-k // self.r)  # ⌈min(m, n) / r⌉
        return self.r * n_bases + n_bases * k  # λ (r × N) + γ (N × min(m, n))


class Bone(PeftTuner):
    """Bone, through PEFT's MiSS: ΔW tiles bᵀ over the n/r column blocks, so y = W0·x + (Σ_j x_(j))·b with
    b ∈ R^{r×m} trained (init 0) and x_(j) the j-th block of r input features. `bat: true` is the "Bat" variant
    (ΔW_ij = W0_ij·b_i + b_i, blockwise), which makes the update depend on W0.

    Kang, "Bone: Block-Affine Adaptation of Large Language Models" (arXiv 2409.15371, renamed MiSS);
    reference JL-er/Bone @ 3f085a142e8f93a2579734d3b294a88e12d25fe7; PEFT removed `BoneConfig` (#3051) in favour of `MissConfig` (init_weights True ≈ Bone,
    "bat" ≈ Bat), used here (peft 0.21).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt; r must divide their input features.
        r: block size (rank of the update's tiling).
        bat: the Bat variant.
        dropout: dropout on the adapter input.
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 r: int = 64, bat: bool = False, dropout: float = 0.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"Bone block size r must be >= 1, got {r}")
        self.r, self.bat, self.dropout = int(r), bool(bat), float(dropout)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        for name, layer in self.target_layers(model, ctx).items():
            if layer.in_features % self.r or (self.bat and layer.out_features % self.r):
                raise ValueError(f"Bone: r={self.r} must divide the features of '{name}' "
                                 f"({layer.out_features}×{layer.in_features}); choose another method.r")
        return super().wrap(model, ctx)

    def peft_config(self, layer_names: list[str], ctx: WrapContext) -> MissConfig:
        return MissConfig(r=self.r, init_weights="bat" if self.bat else True, target_modules=layer_names,
                          miss_dropout=self.dropout, modules_to_save=list(ctx.head_modules) or None)

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.r * base.out_features  # b (r × m)
