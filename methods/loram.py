"""LoRAM: train LoRA on a pruned copy of the model, then recover the adapters to the full model's shape."""

from __future__ import annotations

import copy
from collections.abc import Sequence
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext, head_parameter_count
from methods.structured_lora import DEFAULT_TARGETS, _generator, _kaiming_uniform, stable_seed
from methods.swap import AdaptedLinear, SwapMethod, linear_from, set_submodule

Index = torch.Tensor | None  # kept rows or columns of a pruned layer; None: all of them
#: feed-forward blocks whose hidden neurons structured pruning removes: (up projections, down projection) suffixes
FFN_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("intermediate.dense",), "output.dense"),  # BERT, ViT
    (("mlp.up_proj", "mlp.gate_proj"), "mlp.down_proj"),  # Llama, Qwen, Mistral
    (("mlp.fc1",), "mlp.fc2"),  # CLIP, OPT-style blocks
)


def _sliced(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A Linear holding the kept output rows and input columns of `layer` (copies, so W0 stays intact)."""
    w, b = layer.weight.detach(), layer.bias
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    return linear_from(w, None if b is None else b.detach() if rows is None else b.detach()[rows])


class LoRAMLinear(AdaptedLinear):
    """y = W_p x + s·B A x on the pruned layer W_p (its kept rows `rows` and columns `cols` of W0, m×n); after
    recovery, y = W0 x + s·B̄ Ā x with B̄ (m×r) and Ā (r×n) the trained factors zero-filled at the pruned positions."""

    def __init__(self, base: nn.Linear, full_shape: tuple[int, int], rows: torch.Tensor | None,
                 cols: torch.Tensor | None, r: int, alpha: float, seed: int) -> None:
        super().__init__(base)
        w = base.weight
        self.full_shape, self.rows, self.cols, self.scaling = full_shape, rows, cols, alpha / r
        self.lora_A = nn.Parameter(_kaiming_uniform((r, base.in_features), _generator(seed, "A"), w))  # (r, n')
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))  # (m', r)

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (m', n')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)  # (..., m')
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., m')

    def recovered_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B̄ (m, r), Ā (r, n)): the factors in the full layer's shape, zeros at the pruned rows and columns."""
        m, n = self.full_shape
        b = self.lora_B.new_zeros(m, self.lora_B.shape[1])
        a = self.lora_A.new_zeros(self.lora_A.shape[0], n)
        b[self.rows if self.rows is not None else slice(None)] = self.lora_B.detach()
        a[:, self.cols if self.cols is not None else slice(None)] = self.lora_A.detach()
        return b, a

    def recover(self, full: nn.Linear) -> None:
        """Become the full layer W0 with the recovered factors (trainable as before)."""
        b, a = self.recovered_factors()
        self.base = full.to(self.lora_A.device, self.lora_A.dtype).requires_grad_(False)
        self.in_features, self.out_features = full.in_features, full.out_features
        self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        self.rows = self.cols = None


class LoRAM(SwapMethod):
    """LoRAM: LoRA trained on a pruned model (y = W_p x + s·B A x), recovered to the full model by zero-filling the
    factors at the pruned positions (y = W0 x + s·B̄ Ā x), which is the model that is evaluated and exported.

    Zhang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models", arXiv
    2502.13533 (ICLR 2025); reference junzhang-zj/LoRAM @ 8faa080a3521f58d1a9557ef1e25b377c5969729
    (loram/0_pruned_full_rank_weight_generation.py, 2_pruned_low_rank_matrix_training.py,
    3_recovered_low_rank_matrix_generation.py: the zero-filled "zeroA" recovery).

    - `prune: structured` (the paper's LoRAM-Stru / LoRAM-Rand): in every feed-forward block (FFN_PATTERNS) a share
      `ratio` of the hidden neurons is removed — the rows of the up projections and the columns of the down
      projection — chosen by importance `magnitude` (the smallest ‖W_up[i,:]‖² + ‖W_down[:,i]‖², summed over the up
      projections) or `random` (seeded). The pruned layers are physically smaller, so training holds fewer weights,
      activations and gradients. Recovery puts W0 back and zero-fills B̄'s pruned rows (up projections) and Ā's pruned
      columns (down projection), as the reference's zeroA.
    - `prune: unstructured` (LoRAM-Unst): the smallest-|w| share `ratio` of each target weight is zeroed; shapes do
      not change, so recovery only restores W0 (the adapters need no filling).

    The model trained is not the base (init_equals_base is False) and post_train rebuilds the model that is scored
    (rebuilds_in_post_train); post_train also scores the pruned model first (`loram_pruned_<metric>`). The original
    weights of the pruned layers wait on the CPU during training, where a GPU run keeps them off the device.

    Where this differs from the paper: its LoRAM-Stru prunes with LLM-Pruner (first-order Taylor importance on
    calibration data) and also removes attention heads, and it skips the first and last blocks; here neurons only,
    every block, importance by weight magnitude (or random: LoRAM-Rand). Unstructured pruning is by magnitude
    (the paper uses SparseGPT). The paper's optional alignment step (continued pretraining of the pruned model on
    general text before LoRA training) is not done; a user can run it as a separate full fine-tuning of the pruned
    checkpoint.

    Args:
        lr: learning rate of A, B and the task head.
        target_modules: module-name suffixes of the Linear layers that get adapters.
        r: rank of B A.
        alpha: scaling numerator; s = alpha / r.
        prune: structured (feed-forward neurons) or unstructured (entries of the target weights).
        ratio: share of neurons (structured) or entries (unstructured) pruned, in [0, 1).
        importance: magnitude or random (structured pruning's choice of neurons).
    """

    family = "compression"
    init_equals_base = False
    rebuilds_in_post_train = True

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 8.0,
                 prune: str = "structured", ratio: float = 0.5, importance: str = "magnitude") -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if prune not in ("structured", "unstructured"):
            raise ValueError(f"LoRAM prune must be structured or unstructured, got {prune!r}")
        if importance not in ("magnitude", "random"):
            raise ValueError(f"LoRAM importance must be magnitude or random, got {importance!r}")
        if not 0.0 <= ratio < 1.0 or r < 1:
            raise ValueError(f"LoRAM needs 0 <= ratio < 1 and r >= 1, got ratio={ratio}, r={r}")
        self.r, self.alpha, self.prune, self.ratio = int(r), float(alpha), prune, float(ratio)
        self.importance = importance
        self._originals: dict[str, nn.Linear] = {}  # pruned layer -> its full copy, on the CPU until recovery

    @property
    def unsupported_heads(self) -> dict[str, str]:  # type: ignore[override]
        """A diffusion UNet's feed-forward blocks (GEGLU, gate and value in one projection) are not in FFN_PATTERNS."""
        if self.prune != "structured":
            return {}
        return {"diffusion": "LoRAM's structured pruning knows no feed-forward block of a diffusion UNet (its GEGLU "
                             "projections); use method.prune=unstructured"}

    # ------------------------------------------------------------------------------------------ pruning
    def ffn_blocks(self, model: nn.Module) -> list[tuple[list[str], str]]:
        """Every feed-forward block of the model as ([up projection names], down projection name)."""
        names = dict(model.named_modules())
        blocks = []
        for ups, down in FFN_PATTERNS:
            for name in names:
                if name.endswith(ups[0]):
                    prefix = name[: -len(ups[0])]
                    group = [prefix + u for u in ups]
                    if all(isinstance(names.get(n), nn.Linear) for n in [*group, prefix + down]):
                        blocks.append((group, prefix + down))
        if not blocks:
            raise ValueError(f"LoRAM structured pruning found no feed-forward block in {type(model).__name__} (looked "
                             f"for {[u[0] for u, _ in FFN_PATTERNS]}); use method.prune=unstructured")
        return blocks

    def kept_neurons(self, model: nn.Module, ups: list[str], down: str, seed: int) -> torch.Tensor:
        """The sorted indices of the hidden neurons a block keeps."""
        hidden = model.get_submodule(ups[0]).out_features
        keep = hidden - int(round(self.ratio * hidden))
        if self.importance == "random":
            device = model.get_submodule(down).weight.device
            return torch.randperm(hidden, generator=_generator(seed, "loram", down))[:keep].sort().values.to(device)
        score = model.get_submodule(down).weight.detach().float().pow(2).sum(0)  # (hidden,) down columns
        for up in ups:
            score = score + model.get_submodule(up).weight.detach().float().pow(2).sum(1)  # (hidden,) up rows
        return torch.topk(score, keep).indices.sort().values.to(model.get_submodule(down).weight.device)

    def pruned_shapes(self, model: nn.Module, seed: int) -> dict[str, tuple[tuple[int, int], Index, Index]]:
        """{layer: (its pruned (out, in) shape, kept rows, kept columns)} for every layer structured pruning shrinks."""
        out = {}
        if self.prune != "structured":
            return out
        for ups, down in self.ffn_blocks(model):
            kept = self.kept_neurons(model, ups, down, seed)
            for up in ups:
                out[up] = ((kept.numel(), model.get_submodule(up).in_features), kept, None)
            out[down] = ((model.get_submodule(down).out_features, kept.numel()), None, kept)
        return out

    # ----------------------------------------------------------------------------------------- setup
    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        targets = self.target_layers(model, ctx)
        shapes = self.pruned_shapes(model, ctx.seed)
        model.requires_grad_(False)
        self._originals = {}
        for name in sorted(set(shapes) | (set(targets) if self.prune == "unstructured" else set())):
            layer = model.get_submodule(name)
            self._originals[name] = copy.deepcopy(layer).to("cpu").requires_grad_(False)
            if self.prune == "structured":
                _, rows, cols = shapes[name]
                set_submodule(model, name, _sliced(layer, rows, cols))
            else:  # zero the smallest-|w| entries in place of a copy
                pruned = _sliced(layer, None, None)
                k = int(self.ratio * pruned.weight.numel())
                if k:
                    threshold = pruned.weight.detach().abs().flatten().kthvalue(k).values
                    with torch.no_grad():
                        pruned.weight.masked_fill_(pruned.weight.abs() <= threshold, 0.0)
                set_submodule(model, name, pruned)
        for name in targets:
            base = model.get_submodule(name)
            full = self._originals.get(name, base)
            _, rows, cols = shapes.get(name, (None, None, None))
            set_submodule(model, name, LoRAMLinear(base, (full.out_features, full.in_features), rows, cols, self.r,
                                                    self.alpha, seed=stable_seed(ctx.seed, "loram", name)))
        for head in ctx.head_modules:
            model.get_submodule(head).requires_grad_(True)
        return model

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.r * (base.in_features + base.out_features)

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        """r(m' + n') per target layer, m' and n' its pruned sizes, plus the head."""
        shapes = self.pruned_shapes(model, ctx.seed)
        total = head_parameter_count(model, ctx)
        for name, base in self.target_layers(model, ctx).items():
            m, n = shapes[name][0] if name in shapes else (base.out_features, base.in_features)
            total += self.r * (m + n)
        return total

    # ------------------------------------------------------------------------------------- recovery
    def recover(self, model: nn.Module) -> None:
        """The full model: W0 back in every pruned layer, the adapters zero-filled to the full shapes."""
        for name, full in self._originals.items():
            layer = model.get_submodule(name)
            if isinstance(layer, LoRAMLinear):
                layer.recover(copy.deepcopy(full))
            else:
                ref = next(layer.parameters())
                set_submodule(model, name, copy.deepcopy(full).to(ref.device, ref.dtype))
        self._originals = {}

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if ctx.evaluate is not None:
            metrics = {f"loram_pruned_{k}": v for k, v in ctx.evaluate(model).items()}
        trained = sum(p.numel() for p in model.parameters())
        self.recover(model)
        metrics["loram_trained_model_share"] = trained / sum(p.numel() for p in model.parameters())  # parameters
        return metrics

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = s·B̄Ā in the full shape (float64), the update the recovered model adds to W0."""
        out = {}
        with torch.no_grad():
            for name, layer in self.adapted_layers(model).items():
                b, a = layer.recovered_factors()
                out[name] = (layer.scaling * (b.double().cpu() @ a.double().cpu())).float()
        return out

