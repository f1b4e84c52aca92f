"""Structured LoRA variants PEFT does not implement: NOLA, Block-LoRA, Hydra and WaRA (the mergeable v1).

Each is an AdaptedLinear (the parameterisation of one layer: ΔW in closed form and a cheaper factored forward) and
a SwapMethod (hyper-parameters and the per-layer trainable count). Every random tensor a layer draws, whether a
trainable initialisation or a frozen basis, comes from a private generator seeded by `stable_seed(ctx.seed, layer
name, ...)`. So the draws do not depend on the global RNG or on the order of the layers, and a second wrap of the same
base with the same seed rebuilds every frozen tensor bit for bit (this is how NOLA's bases survive a save/load
round trip without being saved).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.swap import AdaptedLinear, SwapMethod, frozen_random

DEFAULT_TARGETS = ("query", "key", "value", "dense")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from `parts`. Unlike hash(), which Python salts per process, it is the same in every process."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """LoRA's A init, kaiming-uniform(a=√5), i.e. U(±1/√fan_in). It is drawn on the CPU from `generator`, then moved to `like`."""
    out = torch.empty(shape)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out.to(like.device, like.dtype)


def _require_even(method: str, name: str, base: nn.Linear) -> None:
    odd = [f"{what}={size}" for what, size in (("in_features", base.in_features), ("out_features", base.out_features))
           if size % 2]
    if odd:
        raise ValueError(f"{method}: the Haar DWT halves both dimensions, but layer '{name}' has odd {', '.join(odd)}; "
                         f"narrow method.target_modules to layers with even sizes")


# ============================================================================================ NOLA
class SeededBasis:
    """`count` frozen random matrices of one shape, basis_i = (2·U_i − 1)/√count with U_i ~ U[0, 1), regenerable
    from a single seed.

    The bases are drawn in fixed blocks of BLOCK matrices. Block b comes from a CPU generator seeded with
    stable_seed(seed, b), so its values depend on neither the device nor the dtype nor the order in which blocks are
    drawn. Drawing on the CPU is what makes them identical everywhere. A GPU run pays for it by copying each block to
    the device.
    """

    BLOCK = 64  # bases drawn per generator seed; also what is in memory at once (BLOCK × rows × cols)

    def __init__(self, seed: int, count: int, shape: tuple[int, int]) -> None:
        self.seed, self.count, self.shape = seed, count, tuple(shape)
        self.scale = 1.0 / math.sqrt(count)  # the reference's U[−1, 1]/√(num_basis)
        self._seeds = [stable_seed(seed, b) for b in range(math.ceil(count / self.BLOCK))]

    def _spans(self) -> Iterator[tuple[int, int, torch.Generator]]:
        for b, seed in enumerate(self._seeds):
            yield b * self.BLOCK, min((b + 1) * self.BLOCK, self.count), torch.Generator().manual_seed(seed)

    def uniform_blocks(self, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, U_start..U_stop−1) as U[0, 1) draws. Callers fold the affine map 2U − 1 and the 1/√count scale
        into the coefficients, which saves two passes over every block."""
        for start, stop, generator in self._spans():
            yield start, stop, torch.rand(stop - start, *self.shape, generator=generator).to(device, dtype)  # (c, rows, cols)

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All bases at once, (count, rows, cols). For tests and analysis only; training never holds them all."""
        return torch.cat([frozen_random((stop - start, *self.shape), generator).to(dtype)
                          for start, stop, generator in self._spans()]) * self.scale


class _BasisCombination(torch.autograd.Function):
    """Σ_i c_i·basis_i with the bases regenerated block by block in forward and again in backward.

    This is the reference's memory trick (GenerateParams): autograd keeps no basis. Only the coefficients are saved,
    and the backward pass redraws each block to compute ∂L/∂c_i = ⟨∂L/∂M, basis_i⟩. Since basis_i = (2U_i − 1)·σ,
    Σ c_i·basis_i = 2σ·Σ c_i·U_i − σ·Σ c_i and ⟨G, basis_i⟩ = σ·(2⟨G, U_i⟩ − ΣG).
    """

    @staticmethod
    def forward(ctx: Any, coef: torch.Tensor, basis: SeededBasis) -> torch.Tensor:
        ctx.basis = basis
        with torch.autocast(coef.device.type, enabled=False):  # A and B are built in the coefficients' precision
            twice = coef * (2 * basis.scale)  # (count,)
            out = (-basis.scale * coef.sum()).expand(basis.shape).clone()  # (rows, cols): the −σ·Σc term
            for start, stop, block in basis.uniform_blocks(coef.device, coef.dtype):
                out += torch.tensordot(twice[start:stop], block, dims=1)  # (rows, cols)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        basis: SeededBasis = ctx.basis
        flat = grad.reshape(-1)  # (rows·cols,)
        inner = grad.new_empty(basis.count)  # (count,): ⟨G, U_i⟩
        for start, stop, block in basis.uniform_blocks(grad.device, grad.dtype):
            inner[start:stop] = block.reshape(stop - start, -1) @ flat  # (c,)
        return (2 * inner - flat.sum()) * basis.scale, None


class NOLALinear(AdaptedLinear):
    """One NOLA layer: A = A0 + Σ_i α_i·𝒜_i (r×n), B = Σ_j β_j·ℬ_j (m×r), y = W0·x + b + s·B(A·x)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, k: int, l: int, seed: int,
                 store_bases: bool = False) -> None:
        super().__init__(base)
        m, n, w = self.out_features, self.in_features, base.weight
        self.r, self.scaling, self.seed, self.store_bases = r, alpha / r, seed, store_bases
        # A0 is frozen and regenerated from the seed, so it is never saved (a non-persistent buffer)
        self.register_buffer("A0", _kaiming_uniform((r, n), _generator(seed, "A0"), w), persistent=False)  # (r, n)
        self.alpha = nn.Parameter(torch.zeros(k, device=w.device, dtype=w.dtype))  # (k,)
        self.beta = nn.Parameter(torch.zeros(l, device=w.device, dtype=w.dtype))  # (l,)
        self.basis_a = SeededBasis(stable_seed(seed, "A"), k, (r, n))  # 𝒜_1..𝒜_k, each (r, n)
        self.basis_b = SeededBasis(stable_seed(seed, "B"), l, (m, r))  # ℬ_1..ℬ_l, each (m, r)
        if store_bases:  # drawn once and kept (non-persistent: still regenerated, never saved), k·r·n + l·m·r floats
            self.register_buffer("stored_a", self.basis_a.materialize().to(w.device, w.dtype), persistent=False)
            self.register_buffer("stored_b", self.basis_b.materialize().to(w.device, w.dtype), persistent=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store_bases:  # one contraction each way; autograd's backward is another (no redraw)
            a = self.A0 + torch.tensordot(self.alpha, self.stored_a, dims=1)  # (r, n)
            b = torch.tensordot(self.beta, self.stored_b, dims=1)  # (m, r)
            return a, b
        a = self.A0 + _BasisCombination.apply(self.alpha, self.basis_a)  # (r, n)
        b = _BasisCombination.apply(self.beta, self.basis_b)  # (m, r)
        return a, b

    def delta(self) -> torch.Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return self.base(x) + self.scaling * F.linear(F.linear(x, a), b)  # (..., m)

    def extra_repr(self) -> str:
        return f"r={self.r}, k={self.basis_a.count}, l={self.basis_b.count}, seed={self.seed}"


class NOLA(SwapMethod):
    """NOLA: y = W0·x + s·B(A·x), with A = A0 + Σ_{i≤k} α_i·𝒜_i and B = Σ_{j≤l} β_j·ℬ_j; only α, β are trained.

    Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash, "NOLA: Compressing LoRA using Linear Combination of
    Random Basis", arXiv 2310.02556 (ICLR 2024). Reference: UCDvision/NOLA at
    03c7027c244b5ab16de540dd8e37ea4b4e614129, the LoRA-based variant of `gpt/src/model_nola.py` and
    `llama/peft/tuners/lora.py`. We follow it in these points:
    - bases U[−1, 1]/√k (`GenerateParams`: uniform_(−1, 1) × 1/√num_basis), one seed per factor of every layer;
    - A0 is the frozen kaiming-uniform(a=√5) LoRA A and B's frozen part is zero (`reset_lora_parameters`);
    - α = β = 0 at init, so the model starts at W0;
    - the bases are regenerated in forward and backward rather than stored (the autograd function above).
    The layer seed is stable_seed(ctx.seed, layer name), not a random draw kept in the checkpoint as in the
    reference. The bases are drawn in blocks of SeededBasis.BLOCK on the CPU, so peak memory is one block and not k
    matrices, and the values are the same on every device. The repository's ViT code (`vit/NOLA.py`, NOLA2) is a
    different variant: bases stored as frozen parameters, no A0, α = β = 1/k at init. It does not start at W0 and is
    not implemented here.

    Cost: every forward and every backward redraws k·r·n + l·m·r numbers per layer. That is cheap on a GPU and is the
    dominant cost on a CPU. With `store_bases: true` the bases are drawn once and kept in memory instead (the same
    values: SeededBasis.materialize), 4·(k·r·n + l·m·r) bytes per layer in fp32 (on MiniLM with k = l = 512, r = 8:
    about 680 MB for its 36 target layers), and each step costs two contractions instead of two redraws.

    Args:
        lr: learning rate of α, β (and the task head).
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: rank of B·A.
        alpha: scaling numerator; s = alpha / r.
        k: number of random bases (and coefficients α) of A.
        l: number of random bases (and coefficients β) of B.
        store_bases: keep the bases in memory instead of redrawing them in every forward and backward.
    """

    family = "random bases"

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 8.0,
                 k: int = 512, l: int = 512, store_bases: bool = False) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1 or k < 1 or l < 1:
            raise ValueError(f"NOLA needs r, k, l >= 1; got r={r}, k={k}, l={l}")
        self.r, self.alpha, self.k, self.l, self.store_bases = int(r), float(alpha), int(k), int(l), bool(store_bases)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> NOLALinear:
        return NOLALinear(base, self.r, self.alpha, self.k, self.l, seed=stable_seed(ctx.seed, name),
                          store_bases=self.store_bases)

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.k + self.l  # α (k) + β (l), whatever the layer's shape


# ====================================================================================== Block-LoRA
class BlockLoRALinear(AdaptedLinear):
    """One Block-LoRA layer: y = W0·x + b + s·B·A_s(Σ_j x_(j)), with x_(j) the j-th of k input blocks."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, n_blocks: int, generator: torch.Generator) -> None:
        super().__init__(base)
        m, n, w = self.out_features, self.in_features, base.weight
        self.r, self.n_blocks, self.scaling = r, n_blocks, alpha / r
        self.A_s = nn.Parameter(_kaiming_uniform((r, n // n_blocks), generator, w))  # (r, n/k), shared by all blocks
        self.B = nn.Parameter(torch.zeros(m, r, device=w.device, dtype=w.dtype))  # (m, r)

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A_s.repeat(1, self.n_blocks))  # (m, n): A = [A_s, A_s, …, A_s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = x.unflatten(-1, (self.n_blocks, -1)).sum(-2)  # (..., n/k): Σ_j x_(j), additions instead of k products
        return self.base(x) + self.scaling * F.linear(F.linear(folded, self.A_s), self.B)  # (..., m)

    def extra_repr(self) -> str:
        return f"r={self.r}, n_blocks={self.n_blocks}"


class BlockLoRA(SwapMethod):
    """Block-LoRA: y = W0·x + s·B·A_s(Σ_{j≤k} x_(j)), i.e. ΔW = s·B·[A_s, A_s, …, A_s] (k column blocks of A shared).

    Zhou, Shen, Yu, Bu, Wang, "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot
    Learning", arXiv 2501.16720. No code was found, so this follows the paper's description: LoRA's down-projection
    is partitioned into k sub-matrices that share one A_s ∈ R^{r×n/k}, which turns the k block products into a sum of
    the input blocks. Init as LoRA (A_s kaiming-uniform(a=√5) on its own r×n/k shape, B = 0), so with k = 1 this is
    exactly LoRA. Parameters: r·(m + n/k) per layer.

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: rank of B·A_s.
        alpha: scaling numerator; s = alpha / r.
        n_blocks: k, the number of input blocks sharing A_s; it must divide every adapted layer's in_features.
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 8.0,
                 n_blocks: int = 8) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1 or n_blocks < 1:
            raise ValueError(f"Block-LoRA needs r >= 1 and n_blocks >= 1; got r={r}, n_blocks={n_blocks}")
        self.r, self.alpha, self.n_blocks = int(r), float(alpha), int(n_blocks)

    def _check(self, name: str, base: nn.Linear) -> None:
        if base.in_features % self.n_blocks:
            divisors = [d for d in range(1, min(base.in_features, 64) + 1) if base.in_features % d == 0]
            raise ValueError(f"Block-LoRA: n_blocks={self.n_blocks} does not divide in_features={base.in_features} "
                             f"of layer '{name}'; choose a divisor of every adapted layer's input size "
                             f"(divisors of {base.in_features} up to 64: {divisors})")

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> BlockLoRALinear:
        self._check(name, base)
        return BlockLoRALinear(base, self.r, self.alpha, self.n_blocks, _generator(ctx.seed, name, "init"))

    def layer_trainable(self, base: nn.Linear) -> int:
        self._check(f"<{base.in_features}→{base.out_features}>", base)
        return self.r * (base.out_features + base.in_features // self.n_blocks)  # B (m×r) + A_s (r×n/k)


# =========================================================================================== Hydra
class HydraLinear(AdaptedLinear):
    """One Hydra layer: h = W0·x + b; y = h + s·[(B_p(A_p·x + a_p) + b_p) + (B_s(A_s·h + a_s) + b_s)]."""

    def __init__(self, base: nn.Linear, r_par: int, r_seq: int, scale: float, adapter_bias: bool, init_std: float,
                 generator: torch.Generator) -> None:
        super().__init__(base)
        m, n, w = self.out_features, self.in_features, base.weight
        self.scale = scale

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=generator) * init_std).to(w.device, w.dtype))

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, device=w.device, dtype=w.dtype))

        self.A_p, self.B_p = normal(r_par, n), zeros(m, r_par)  # parallel branch on x: (r_p, n), (m, r_p)
        self.A_s, self.B_s = normal(r_seq, m), zeros(m, r_seq)  # sequential branch on W0·x + b: (r_s, m), (m, r_s)
        self.a_p, self.b_p = (zeros(r_par), zeros(m)) if adapter_bias else (None, None)  # down / up biases
        self.a_s, self.b_s = (zeros(r_seq), zeros(m)) if adapter_bias else (None, None)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B_p @ self.A_p + self.B_s @ (self.A_s @ self.base.weight))  # (m, n)

    def bias(self) -> torch.Tensor | None:
        """b' = b + s·(B_s·A_s·b + B_p·a_p + b_p + B_s·a_s + b_s)."""
        b0 = self.base.bias
        terms = []
        if b0 is not None:
            terms.append(self.B_s @ (self.A_s @ b0))  # (m,)
        if self.a_p is not None:
            terms += [self.B_p @ self.a_p + self.b_p, self.B_s @ self.a_s + self.b_s]  # (m,), (m,)
        if not terms:
            return b0
        extra = self.scale * sum(terms)  # (m,)
        return extra if b0 is None else b0 + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., m)
        par = F.linear(F.linear(x, self.A_p, self.a_p), self.B_p, self.b_p)  # (..., m)
        seq = F.linear(F.linear(h, self.A_s, self.a_s), self.B_s, self.b_s)  # (..., m)
        return h + self.scale * (par + seq)


class Hydra(SwapMethod):
    """Hydra: y = W0·x + B_p·A_p·x + B_s·A_s·(W0·x), with biases. It merges to W' = W0 + B_pA_p + B_sA_s·W0.

    The parallel branch (LoRA-like) learns new features. The sequential branch linearly recombines the pre-trained
    features W0·x + b. Kim, Yang, Kim, Hong, Park, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
    Fine-tuning", arXiv 2309.06922. Reference: extremebird/Hydra at 4138457859666d49b9ca9e45473d8570586670bb.
    The few-shot CLIP code (`elevater/.../Hydra_model.py`: `Hydra`, `HydraMLP`) gives:
    - both branches are biased Linear pairs, down-projection N(0, 0.02), up-projection and all biases 0
      (init_option "lora"), so the model starts at W0;
    - a fixed output scale (1.0);
    - the sequential branch reads the full output W0·x + b.
    The VTAB code's `reparameterize` merges to W' = W0 + s(W_p + W_s·W0) and b' = b + s(W_s·b + b_p + b_s).
    Ranks are the repository's GLUE script (`nlu/hydra_sst2.sh`: parallel 4, sequential 8). The repository applies
    Hydra to the output projections only (MLP fc2, attention proj); here target_modules decides, with the benchmark's
    default. Parameters per layer: r_p(n + m) + 2·r_s·m (+ r_p + r_s + 2m with biases).

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r_par: rank of the parallel branch B_p·A_p (on the layer input x).
        r_seq: rank of the sequential branch B_s·A_s (on the layer output W0·x + b).
        scale: fixed multiplier of both branches (the reference's `scale`, 1.0).
        adapter_bias: give the four projections biases (CLIP/VTAB code) or not (the NLU code).
        init_std: standard deviation of the normal init of A_p and A_s.
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, r_par: int = 4, r_seq: int = 8,
                 scale: float = 1.0, adapter_bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r_par < 1 or r_seq < 1:
            raise ValueError(f"Hydra needs r_par, r_seq >= 1; got r_par={r_par}, r_seq={r_seq}")
        if not init_std > 0:
            raise ValueError(f"Hydra init_std must be > 0, got {init_std}")
        self.r_par, self.r_seq, self.scale = int(r_par), int(r_seq), float(scale)
        self.adapter_bias, self.init_std = bool(adapter_bias), float(init_std)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> HydraLinear:
        return HydraLinear(base, self.r_par, self.r_seq, self.scale, self.adapter_bias, self.init_std,
                           _generator(ctx.seed, name, "init"))

    def layer_trainable(self, base: nn.Linear) -> int:
        m, n = base.out_features, base.in_features
        count = self.r_par * (n + m) + self.r_seq * (m + m)  # A_p, B_p, A_s, B_s
        if self.adapter_bias:
            count += self.r_par + m + self.r_seq + m  # a_p, b_p, a_s, b_s
        return count


# ============================================================================================ WaRA
_SQRT_HALF = math.sqrt(0.5)


def _haar(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the orthonormal Haar DWT along `dim`: (low, high), each half as long. Low = (x_2i + x_2i+1)/√2."""
    pairs = x.movedim(dim, -1).unflatten(-1, (-1, 2))  # (..., len/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (..., len/2)
    return ((even + odd) * _SQRT_HALF).movedim(-1, dim), ((even - odd) * _SQRT_HALF).movedim(-1, dim)


def _ihaar(low: torch.Tensor, high: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The inverse of _haar: interleave (low + high)/√2 and (low − high)/√2 along `dim`."""
    low, high = low.movedim(dim, -1), high.movedim(dim, -1)  # (..., len/2)
    out = torch.stack(((low + high) * _SQRT_HALF, (low - high) * _SQRT_HALF), dim=-1).flatten(-2)  # (..., len)
    return out.movedim(-1, dim)


class WaRALinear(AdaptedLinear):
    """One WaRA layer: y = W0·x + b + IDWT_m(s·B_w·A_w applied to each subband of DWT_n(x))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__(base)
        m, n, w = self.out_features, self.in_features, base.weight
        self.r, self.scaling = r, alpha / r
        self.A_w = nn.Parameter(_kaiming_uniform((r, n // 2), generator, w))  # (r, n/2)
        self.B_w = nn.Parameter(torch.zeros(m // 2, r, device=w.device, dtype=w.dtype))  # (m/2, r)

    def delta(self) -> torch.Tensor:
        """ΔW = H_mᵀ·(I₂ ⊗ s·B_w·A_w)·H_n, built with O(mn) Haar steps instead of dense H matrices."""
        core = self.scaling * (self.B_w @ self.A_w)  # (m/2, n/2), the same for the low and high subbands
        zero = torch.zeros_like(core)
        low_rows = _ihaar(core, zero, dim=-1)  # (m/2, n): [core, 0]·H_n
        high_rows = _ihaar(zero, core, dim=-1)  # (m/2, n): [0, core]·H_n
        return _ihaar(low_rows, high_rows, dim=0)  # (m, n): H_mᵀ·(…)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = torch.stack(_haar(x, dim=-1))  # (2, ..., n/2): low and high feature subbands
        coded = self.scaling * F.linear(F.linear(bands, self.A_w), self.B_w)  # (2, ..., m/2): one shared adapter
        return self.base(x) + _ihaar(coded[0], coded[1], dim=-1)  # (..., m)

    def extra_repr(self) -> str:
        return f"r={self.r}"


class WaRA(SwapMethod):
    """WaRA (v1): y = W0·x + IDWT(s·B_w·A_w·DWT(x)); merged, ΔW = H_mᵀ(I₂ ⊗ s·B_w·A_w)H_n, so rank(ΔW) ≤ 2r.

    Heidari, Medghalchi, Khoursha, Rezaeian, Hacihaliloglu, "WaRA: Wavelet Low Rank Adaptation",
    arXiv 2506.24092v1 (the first, mergeable version). The authors' repository (moeinheidari7829/WaRA) was not
    available to us, so this follows the v1 paper. The activations X (n features × tokens) go through a one-level 2-D
    Haar DWT. One shared low-rank map B_w·A_w (A_w ∈ R^{r×n/2}, B_w ∈ R^{m/2×r}) is applied to each of the four
    subbands, and an IDWT reconstructs the update. Since the same map acts on every subband and Haar is orthogonal,
    the token-axis transform cancels exactly (for an even number of tokens). That is what makes v1 mergeable, so only
    the feature-axis DWT is applied here, which also keeps padded tokens from mixing with real ones. The v2 revision
    (a patch-grid DWT over image tokens) cannot be merged and is not implemented.

    Note (checked in tests): with a single level and one adapter shared by the low and high subbands, the feature-axis
    Haar filters cancel too. H_mᵀ(I₂⊗M)H_n = P_mᵀ(I₂⊗M)P_n, where P de-interleaves even and odd indices, so ΔW
    applies M to the even features → even outputs and the odd features → odd outputs.

    Init as LoRA (A_w kaiming-uniform(a=√5), B_w = 0), so the model starts at W0. Parameters: r·(m + n)/2 per layer.
    Both m and n must be even.

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: rank of B_w·A_w (ΔW has rank ≤ 2r).
        alpha: scaling numerator; s = alpha / r.
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, r: int = 8,
                 alpha: float = 8.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if r < 1:
            raise ValueError(f"WaRA rank r must be >= 1, got {r}")
        self.r, self.alpha = int(r), float(alpha)

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> WaRALinear:
        _require_even("WaRA", name, base)
        return WaRALinear(base, self.r, self.alpha, _generator(ctx.seed, name, "init"))

    def layer_trainable(self, base: nn.Linear) -> int:
        _require_even("WaRA", f"<{base.in_features}→{base.out_features}>", base)
        return self.r * (base.out_features // 2 + base.in_features // 2)  # B_w (m/2×r) + A_w (r×n/2)
