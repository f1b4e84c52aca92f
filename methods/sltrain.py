"""SLTrain: a low-rank plus fixed-support sparse parameterisation of each Linear, for fine-tuning or from scratch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext, head_parameter_count
from methods.structured_lora import DEFAULT_TARGETS, _generator, _kaiming_uniform, stable_seed
from methods.swap import AdaptedLinear, SwapMethod


def support_size(m: int, n: int, density: float) -> int:
    """|Ω| = ⌊δ·m·n⌋, the reference's int(sp_ratio · total_elements)."""
    return int(density * m * n)


class SLTrainLinear(AdaptedLinear):
    """W' = W0 + s·B·A + S (fine-tuning) or W' = s·B·A + S (from scratch: W0 is dropped), S zero outside Ω.

    Ω, the support of S, is ⌊δ·m·n⌋ flat positions of the m×n weight drawn uniformly without replacement (a
    permutation's first entries, sorted) from a generator seeded by the layer's name, and never changes. S's values
    are one flat trainable vector (|Ω|,) scattered into the weight at every forward; Ω is a non-persistent buffer,
    rebuilt bit for bit by any wrap with the same seed, so the saved adapter is exactly B, A and the values.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, density: float, seed: int,
                 from_scratch: bool) -> None:
        super().__init__(base)
        m, n = base.out_features, base.in_features
        w = base.weight
        self.r, self.scaling, self.from_scratch = r, alpha / r, from_scratch
        generator = _generator(seed, "support")
        k = support_size(m, n, density)
        index = torch.randperm(m * n, generator=generator)[:k].sort().values  # (k,) fixed support Ω
        self.register_buffer("index", index.to(w.device), persistent=False)
        self.lora_A = nn.Parameter(_kaiming_uniform((r, n), _generator(seed, "A"), w))  # (r, n)
        self.lora_B = nn.Parameter(torch.zeros(m, r, device=w.device, dtype=w.dtype))  # (m, r): B = 0
        values = torch.zeros(k, device=w.device, dtype=w.dtype)  # (k,) fine-tuning: S = 0, the model starts at W0
        if from_scratch:  # the reference's pretraining init: U(±1/√n) on Ω, and no W0 at all
            bound = 1.0 / math.sqrt(n)
            values = (torch.rand(k, generator=_generator(seed, "S")) * 2 * bound - bound).to(w.device, w.dtype)
            base.weight = None  # W0 is absent: its memory goes with it
            if base.bias is not None:
                base.bias.requires_grad_(True)  # pretraining trains every bias
        self.values = nn.Parameter(values)

    def sparse(self) -> torch.Tensor:
        """S (m×n): the trainable values on Ω, zeros elsewhere."""
        flat = self.values.new_zeros(self.out_features * self.in_features)  # (m·n,)
        return flat.index_put((self.index,), self.values).view(self.out_features, self.in_features)  # (m, n)

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A) + self.sparse()  # (m, n)

    def weight(self) -> torch.Tensor:
        return self.delta() if self.from_scratch else self.base.weight + self.delta()  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the dense scatter of S is one m×n pass, as large as the matmul with W0; the low-rank part stays factored
        w = self.sparse() if self.from_scratch else self.base.weight + self.sparse()  # (m, n)
        y = F.linear(x, w, self.bias())  # (..., m)
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., m)


class SLTrain(SwapMethod):
    """SLTrain: W = s·B·A + S with S sparse on a fixed random support; as fine-tuning, W' = W0 + s·B·A + S.

    Han, Li, Jawanpuria, Mishra et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
    pretraining", arXiv 2406.02214 (NeurIPS 2024); reference andyjm3/SLTrain @ 2335d6243ec7e8b9ae32e59bfbde6d40c4e84d19
    (splora/splora_linear.py, splora/splora_model.py, scripts/llm_pretrain/sltrain60m.sh).

    Per target Linear (m×n): B (m×r) = 0 and A (r×n) kaiming-uniform(a=√5), s = α/r, as in the reference; Ω is
    ⌊δ·m·n⌋ positions drawn uniformly without replacement and fixed for the whole run (the paper's random support);
    S's values on Ω train. Trainable per layer: r(m+n) + ⌊δmn⌋.

    - `from_scratch: false` (fine-tuning, the benchmark's default): W0 frozen, S = 0 at init, so the model starts at
      the base; the rest of the model is frozen and the task head trains, as for every adapter. The paper itself
      trains from scratch only; this mode is its parameterisation added to a pretrained W0.
    - `from_scratch: true` (the paper's pretraining): each target weight is dropped (W = s·B·A + S, S initialised
      U(±1/√n) on Ω as in the reference) and every other parameter, the target layers' biases included, trains in
      full; use it with a randomly initialised model (e.g. model=tiny_llama). Trainable: r(m+n) + ⌊δmn⌋ + m (bias)
      per target layer plus all the parameters outside the target weights.

    Where this differs from the reference: Ω is drawn from a generator seeded by the run seed and the layer name
    (the reference uses the global RNG), so it is rebuilt rather than saved; S is scattered into a dense m×n matrix
    (the reference has a custom CUDA kernel for the sparse product; the function is the same); the reference's
    pretraining re-initialises each bias U(±1/√m), here the model's own initial bias is kept.

    Args:
        lr: learning rate (AdamW) of B, A, S and whatever else trains.
        target_modules: module-name suffixes of the Linear layers to reparameterise.
        r: rank of B·A (the reference's 60M LLaMA: 128 of 512).
        alpha: scaling numerator; s = alpha / r (the reference's 60M LLaMA: 32).
        density: δ, the share of each weight's entries in Ω (the reference's 60M LLaMA: 0.03).
        from_scratch: drop W0 and train the rest of the model in full (the paper's pretraining).
    """

    family = "sparse"

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 8.0,
                 density: float = 0.03, from_scratch: bool = False) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"SLTrain rank r must be >= 1, got {r}")
        if not 0.0 < density < 1.0:
            raise ValueError(f"SLTrain density must be in (0, 1) (the reference's sp_ratio), got {density}")
        self.r, self.alpha, self.density, self.from_scratch = int(r), float(alpha), float(density), bool(from_scratch)
        self.init_equals_base = not self.from_scratch
        self.trains_rest = self.from_scratch  # pretraining: everything outside the target weights trains in full

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> SLTrainLinear:
        return SLTrainLinear(base, self.r, self.alpha, self.density, seed=stable_seed(ctx.seed, "sltrain", name),
                             from_scratch=self.from_scratch)

    def layer_trainable(self, base: nn.Linear) -> int:
        m, n = base.out_features, base.in_features
        bias = m if self.from_scratch and base.bias is not None else 0
        return self.r * (m + n) + support_size(m, n, self.density) + bias

    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        layers = self.target_layers(model, ctx)
        adapters = sum(self.layer_trainable(b) for b in layers.values())
        if not self.from_scratch:
            return head_parameter_count(model, ctx) + adapters
        replaced = sum(p.numel() for b in layers.values() for p in b.parameters())  # W0 and bias of each target
        return sum(p.numel() for p in model.parameters()) - replaced + adapters
