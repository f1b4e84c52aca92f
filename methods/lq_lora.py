"""LQ-LoRA: split each weight into a quantised frozen part and a trainable low-rank part, W0 ≈ Q + L1·L2."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.special import erfinv
from torch import nn

from methods.base import Batch, LossFn, WrapContext
from methods.lora import LoRA

#: NormalFloat's outermost quantile (bitsandbytes' NF4 offset): the codebook spans N(0, σ)'s quantiles in
#: [1 − δ, δ] with σ chosen so that the extreme values are exactly ±1.
NF_OFFSET = 0.9677083
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}


@dataclass(frozen=True)
class QuantConfig:
    """Blockwise NormalFloat with double quantisation of the block scales (QLoRA's scheme, LQ-LoRA's search space).

    Args:
        bits: bits per weight (b): the NF-b codebook has 2^b values.
        block_size: weights per first-level block (B0), each with its absmax scale.
        scale_bits: bits of each first-level scale (b0), unsigned-integer quantised after subtracting the minimum.
        scale_block_size: first-level scales per second-level block (B1), each with one float scale.
        scale_dtype: storage of the second-level scales (fp32, fp16, bf16).
    """

    bits: int = 4
    block_size: int = 64
    scale_bits: int = 8
    scale_block_size: int = 256
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8 or not 1 <= self.scale_bits <= 8:
            raise ValueError(f"bits and scale_bits must be in 1..8, got {self.bits}, {self.scale_bits}")
        if self.block_size < 1 or self.scale_block_size < 1:
            raise ValueError(f"block sizes must be >= 1, got {self.block_size}, {self.scale_block_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def bits_per_param(self) -> float:
        """Storage per weight: b + b0/B0 + b1/(B0·B1) (the reference's `estimate_storage_from_config`)."""
        return (self.bits + self.scale_bits / self.block_size
                + SCALE_BITS[self.scale_dtype] / (self.block_size * self.scale_block_size))


def normal_float_codebook(bits: int) -> torch.Tensor:
    """The NF-b codebook (2^b values in [−1, 1], sorted, exact 0): quantiles of N(0, σ) at 2^(b−1) evenly spaced
    levels in [1 − δ, ½] and 2^(b−1) + 1 in [½, δ], the shared ½ counted once (QLoRA's NF4 for b = 4)."""
    sigma = -1.0 / (math.sqrt(2.0) * float(erfinv(1.0 - 2.0 * NF_OFFSET)))
    half = 2 ** (bits - 1)
    left = torch.linspace(1.0 - NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    right = torch.linspace(0.5, NF_OFFSET, half + 1, dtype=torch.float64)
    code = torch.distributions.Normal(0.0, sigma).icdf(torch.cat([left, right]))  # (2^b,)
    return code / code.abs().max()  # ±1 exactly, not up to the rounding of icdf


def _absmax_uint(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake unsigned-integer quantisation of x ∈ [0, amax] on 2^bits − 1 levels."""
    levels = 2 ** bits - 1
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.round(x / safe * levels).clamp(0, levels) * safe / levels


def nf_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Dequantised blockwise NF-b quantisation of `w` (any shape), computed in fp32 on w's device.

    The flattened weight is cut into blocks of B0 (the last one zero-padded); each block's absmax s1 is the
    first-level scale. The scales are double-quantised: s1 − min(s1) in groups of B1 is b0-bit unsigned-integer
    quantised against the group's absmax, which is stored in `scale_dtype`. Each weight is then rounded to the
    nearest codebook value of w / ŝ1 and multiplied back by ŝ1.
    """
    flat = w.detach().reshape(-1).float()
    n, b0, b1 = flat.numel(), cfg.block_size, cfg.scale_block_size
    blocks = torch.nn.functional.pad(flat, (0, -n % b0)).view(-1, b0)  # (nb, B0)
    s1 = blocks.abs().amax(dim=1)  # (nb,) first-level scales
    offset = s1.min()
    s2 = s1 - offset  # (nb,) >= 0
    groups = torch.cat([s2, s2[-1:].expand(-s2.numel() % b1)]).view(-1, b1)  # (ng, B1), padded by repeating
    s3 = groups.amax(dim=1, keepdim=True)  # (ng, 1) second-level scales
    s3 = s3.to(SCALE_DTYPES[cfg.scale_dtype]).float()
    s1_hat = (_absmax_uint(groups, s3, cfg.scale_bits).reshape(-1)[: s1.numel()] + offset)  # (nb,)
    scale = torch.where(s1_hat > 0, s1_hat, torch.ones_like(s1_hat))[:, None]  # (nb, 1)
    code = normal_float_codebook(cfg.bits).to(flat.device, torch.float32)  # (2^b,)
    bounds = (code[1:] + code[:-1]) / 2  # (2^b − 1,) midpoints: round to the nearest value
    q = code[torch.bucketize(blocks / scale, bounds)] * scale  # (nb, B0)
    return q.reshape(-1)[:n].view_as(w).to(w.dtype)


Quantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LQResult:
    """W0 ≈ Q + L1·L2 (the kept iterate) and the (weighted) residual of every iteration run: non-increasing up to
    the kept one, whose residual is the minimum; a last, larger entry is the iteration that stopped the loop."""

    l1: torch.Tensor  # (m, r)
    l2: torch.Tensor  # (r, n)
    q: torch.Tensor  # (m, n)
    errors: list[float]


def _low_rank(a: torch.Tensor, r: int, row: torch.Tensor | None, col: torch.Tensor | None,
              oversampling: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (m×r), L2 (r×n) with L1·L2 the rank-r truncated SVD of a, split as U√S, √S·Vᵀ (the reference's
    split). With Fisher scales (row (m,1), col (1,n)) the SVD is of row ⊙ a ⊙ col and the factors are unscaled.
    `oversampling` = None: exact SVD; else torch.svd_lowrank with r + oversampling columns (the reference's)."""
    weighted = a if row is None else row * a * col
    if oversampling is None or r + oversampling >= min(a.shape):
        u, s, vh = torch.linalg.svd(weighted, full_matrices=False)  # (m, k), (k,), (k, n)
    else:
        u, s, v = torch.svd_lowrank(weighted, q=r + oversampling)  # (m, q), (q,), (n, q)
        vh = v.mT
    root = s[:r].sqrt()
    l1, l2 = u[:, :r] * root, root[:, None] * vh[:r]  # (m, r), (r, n)
    if row is not None:
        l1, l2 = l1 / row, l2 / col
    return l1, l2


@torch.no_grad()
def lq_decompose(w: torch.Tensor, r: int, quantize: Quantizer, fisher: torch.Tensor | None = None,
                 max_iterations: int = 100, oversampling: int | None = None) -> LQResult:
    """Alternate (L1, L2) = SVD_r(W − Q) and Q = quantize(W − L1·L2), from Q = 0, while the residual
    ‖√F ⊙ (W − Q − L1·L2)‖_F (F = 1 without Fisher weights) does not rise; keep the last iterate that did not.

    With Fisher weights F (m×n) the SVD step is the reference's "two-sided" heuristic: the rank-r SVD of
    D_r·(W − Q)·D_c with D_r = √mean_j F_ij and D_c = √mean_i F_ij, unscaled afterwards (a weighted low-rank
    problem has no closed form; a rank-1 approximation of F makes it one). `oversampling`: see `_low_rank`.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    w = w.detach().float()
    row = col = None
    if fisher is not None:
        f = fisher.float().to(w.device)
        row = f.mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)  # (m, 1)
        col = f.mean(dim=0, keepdim=True).sqrt().clamp_min(1e-12)  # (1, n)
        weight = f.sqrt()
    q = torch.zeros_like(w)  # (m, n)
    best: LQResult | None = None
    errors: list[float] = []
    for _ in range(max_iterations):
        l1, l2 = _low_rank(w - q, r, row, col, oversampling)
        q = quantize(w - l1 @ l2)
        residual = w - q - l1 @ l2
        error = float((residual if fisher is None else weight * residual).norm())
        errors.append(error)
        if best is not None and error > best.errors[-1]:
            break  # the residual rose: keep the previous iterate (the reference keeps this worse one)
        best = LQResult(l1, l2, q, list(errors))
    assert best is not None
    best.errors = errors
    return best


def fisher_information(model: nn.Module, weights: dict[str, nn.Parameter], batches: Iterable[Batch],
                       loss_fn: LossFn, samples: int) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of each weight: the mean over `samples` single examples of (∂L_i/∂W)²
    (per-example gradients, as the reference computes them with batch size 1)."""
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    seen = 0
    try:
        for batch in batches:
            for i in range(len(next(iter(batch.values())))):
                one = {k: v[i:i + 1] for k, v in batch.items()}
                grads = torch.autograd.grad(loss_fn(model, one), list(weights.values()))
                for name, g in zip(weights, grads):
                    sums[name] += g.float() ** 2
                seen += 1
                if seen >= samples:
                    break
            if seen >= samples:
                break
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if not seen:
        raise RuntimeError("LQ-LoRA's Fisher weighting needs calibration batches; set train.calibration_batches > 0")
    return {name: s / seen for name, s in sums.items()}


def allocate_bits(costs: np.ndarray, storage: np.ndarray, budget: float) -> np.ndarray:
    """The ILP: choose one configuration per matrix minimising Σ cost subject to Σ storage ≤ budget.

    costs, storage: (matrices, configurations). Returns each matrix's chosen configuration index.
    """
    n, k = costs.shape
    if (storage.min(axis=1).sum()) > budget:
        raise ValueError(f"LQ-LoRA bit budget infeasible: the cheapest configurations need "
                         f"{storage.min(axis=1).sum():.4g} bits, the budget is {budget:.4g}; raise method.bit_budget")
    scale = costs.max() if costs.max() > 0 else 1.0  # well-conditioned objective
    one_each = np.kron(np.eye(n), np.ones((1, k)))  # (n, n·k): Σ_j x_ij = 1
    result = milp(
        c=(costs / scale).reshape(-1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(storage.reshape(1, -1), -np.inf, budget)],
        integrality=np.ones(n * k), bounds=Bounds(0, 1),
    )
    if not result.success:
        raise RuntimeError(f"LQ-LoRA bit allocation failed: {result.message}")
    return result.x.reshape(n, k).argmax(axis=1)


def search_space(bits: Sequence[int], block_sizes: Sequence[int], scale_block_sizes: Sequence[int]) -> list[QuantConfig]:
    """The ILP's configurations (the reference also varies b0 and the second-level dtype; 8-bit/fp32 fixed here)."""
    return [QuantConfig(bits=b, block_size=b0, scale_block_size=b1)
            for b in bits for b0 in block_sizes for b1 in scale_block_sizes]


class LQLoRA(LoRA):
    """LQ-LoRA: y = Q·x + s·B·A·x with Q = NF-quant(W0 − s·B0·A0) frozen and B, A trainable, s·B0·A0 + Q ≈ W0.

    Guo, Greengard, Xing, Kim, "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model
    Finetuning", arXiv 2311.12023; reference HanGuo97/lq-lora @ c2424b3adc27197815da1ac9e1304565168d824d
    (models/lq_utils.py `lowrank_quantized_sparse_decomposition`, models/factorizations_utils.py
    `weighted_svd_decomposition`, models/quantization_utils.py "blockwise-nf", models/lora_utils.py
    `transform_lora_layer_lpq`, models/allocation_utils.py).

    Each target W0 is decomposed by `lq_decompose`: alternate the rank-r SVD of W0 − Q and the NormalFloat
    quantisation of W0 − L1·L2 until the residual rises (at most `max_iterations`). The layer's frozen weight
    becomes the dequantised Q and the LoRA factors start at A0 = L2/√s, B0 = L1/√s (the reference's split, so that
    s·B0·A0 = L1·L2). The model starts at Q + L1·L2, not at W0 (`init_equals_base = False`): the quantisation error
    is part of the method. ΔW relative to W0 is Q − W0 + s·B·A: a dense matrix, so export writes a merged model.

    Options:
    - `fisher: true`: the SVD and the stopping residual are weighted by the empirical Fisher diagonal F of each W0
      (per-example squared gradients over `fisher_samples` calibration examples), two-sided row/column scaling.
    - `bit_budget`: the mixed-precision allocation. For every matrix and every configuration of the search space
      (bits × block size × scale block size) the decomposition is run and its squared residual is the cost; an
      integer program (scipy.optimize.milp) picks one configuration per matrix minimising the total cost with the
      average storage (bits per parameter, scales included) at most `bit_budget`. Without it every matrix uses
      `bits`/`block_size`.
    - `quantizer: identity` replaces NF quantisation by the identity (Q = W0 − L1·L2 exactly): a check, not a method.

    Where this differs from the reference: the kept
    iterate is the last one whose residual did not rise (the reference returns the first worse one, a TODO in its
    code); the search space fixes the scale bits at 8 and their dtype at fp32 (the reference also varies them);
    quantisation is simulated (dequantised fp32 weights, the storage counted by formula), as the reference's
    "fake" path does. Q is recomputed deterministically from W0 on reload, so the adapter alone restores a run.

    Args:
        lr: learning rate (the reference's GLUE script: 2e-4 for RoBERTa-large).
        r: rank of L1·L2 (the paper: 64), capped at min(m, n).
        alpha: s = alpha / r (the reference: 16).
        dropout: LoRA dropout (the reference: 0.05).
        bits, block_size, scale_block_size: the fixed NF configuration (QLoRA's NF4: 4, 64, 256).
        max_iterations: cap on the alternating iterations (the paper: 100).
        fisher: Fisher-weighted decomposition from calibration data.
        fisher_samples: examples for the Fisher estimate.
        bit_budget: average bits per parameter for the ILP (the paper: 2.5 – 4.25), or None for fixed `bits`.
        search_bits, search_block_sizes, search_scale_block_sizes: the ILP's configurations.
        quantizer: nf, or identity (tests).
        svd_oversampling: randomised SVD (torch.svd_lowrank, seeded) with r + this many columns, the reference's
            choice and 3× faster here; None for the exact SVD.
    """

    family = "compression"

    init_equals_base = False

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 64,
        alpha: float = 16.0,
        dropout: float = 0.05,
        bits: int = 4,
        block_size: int = 64,
        scale_block_size: int = 256,
        max_iterations: int = 100,
        fisher: bool = False,
        fisher_samples: int = 64,
        bit_budget: float | None = None,
        search_bits: Sequence[int] = (2, 3, 4, 8),
        search_block_sizes: Sequence[int] = (16, 32, 64),
        search_scale_block_sizes: Sequence[int] = (16, 64, 256),
        quantizer: Literal["nf", "identity"] = "nf",
        svd_oversampling: int | None = 10,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout)
        if quantizer not in ("nf", "identity"):
            raise ValueError(f"LQ-LoRA quantizer must be nf or identity, got {quantizer!r}")
        if max_iterations < 1 or fisher_samples < 1:
            raise ValueError(f"need max_iterations >= 1 and fisher_samples >= 1, got {max_iterations}, {fisher_samples}")
        self.qconfig = QuantConfig(bits=bits, block_size=block_size, scale_block_size=scale_block_size)
        self.space = search_space(search_bits, search_block_sizes, search_scale_block_sizes)
        if bit_budget is not None and not min(c.bits_per_param for c in self.space) <= bit_budget:
            raise ValueError(f"bit_budget={bit_budget} is below the cheapest configuration "
                             f"({min(c.bits_per_param for c in self.space):.3f} bits per parameter)")
        self.max_iterations, self.fisher, self.fisher_samples = int(max_iterations), bool(fisher), int(fisher_samples)
        self.bit_budget, self.quantizer = bit_budget, quantizer
        self.oversampling = None if svd_oversampling is None else int(svd_oversampling)
        self.assignment: dict[str, QuantConfig] = {}
        self.errors: dict[str, list[float]] = {}  # each matrix's residual trace (the kept iterate's is the min)
        self.init_residual: dict[str, float] = {}
        self._q: dict[str, torch.Tensor] = {}

    def quantize_fn(self, cfg: QuantConfig) -> Quantizer:
        return (lambda x: x) if self.quantizer == "identity" else (lambda x: nf_quantize(x, cfg))

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self.seed = ctx.seed
        model = super().wrap(model, ctx)  # PEFT LoRA with B = 0: the base until the decomposition below
        if not self.fisher:
            self.decompose(model, fisher=None)
        return model

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        if not self.fisher:
            return
        layers = self.lora_layers(model)
        weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
        with torch.random.fork_rng(devices=[]):  # dropout masks: reproducible from the seed
            torch.manual_seed(self.seed)
            fisher = fisher_information(model, weights, batches, loss_fn, self.fisher_samples)
        self.decompose(model, fisher)

    def rank(self, w: torch.Tensor) -> int:
        return min(self.r, *w.shape)

    @torch.no_grad()
    def decompose(self, model: nn.Module, fisher: dict[str, torch.Tensor] | None) -> None:
        """Pick each matrix's quantisation (fixed, or the ILP), decompose, and install Q, A0, B0."""
        with torch.random.fork_rng(devices=[]):  # the randomised SVD: reproducible from the seed
            torch.manual_seed(self.seed)
            self._decompose(model, fisher)

    def _decompose(self, model: nn.Module, fisher: dict[str, torch.Tensor] | None) -> None:
        layers = self.lora_layers(model)
        w0 = {name: layer.get_base_layer().weight.detach().float() for name, layer in layers.items()}
        f = fisher or {}
        if self.bit_budget is None:
            self.assignment = {name: self.qconfig for name in layers}
        else:
            costs = np.zeros((len(layers), len(self.space)))
            for i, name in enumerate(layers):
                for j, cfg in enumerate(self.space):
                    res = lq_decompose(w0[name], self.rank(w0[name]), self.quantize_fn(cfg), f.get(name),
                                       self.max_iterations, self.oversampling)
                    costs[i, j] = min(res.errors) ** 2
            sizes = np.array([w0[name].numel() for name in layers], dtype=np.float64)
            storage = sizes[:, None] * np.array([c.bits_per_param for c in self.space])[None, :]
            choice = allocate_bits(costs, storage, self.bit_budget * sizes.sum())
            self.assignment = {name: self.space[j] for name, j in zip(layers, choice)}
        for name, layer in layers.items():
            base, s = layer.get_base_layer(), layer.scaling["default"]
            res = lq_decompose(w0[name], self.rank(w0[name]), self.quantize_fn(self.assignment[name]), f.get(name),
                               self.max_iterations, self.oversampling)
            r = res.l1.shape[1]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.zero_()
            b.zero_()
            a[:r].copy_(res.l2 / math.sqrt(s))  # (r, n)
            b[:, :r].copy_(res.l1 / math.sqrt(s))  # (m, r)
            base.weight.copy_(res.q)
            self._q[name] = res.q.detach().to("cpu", torch.float64)
            self.errors[name] = res.errors
            self.init_residual[name] = float((w0[name] - res.q - res.l1 @ res.l2).norm() / w0[name].norm())

    @property
    def average_bits(self) -> float:
        """Storage of the quantised matrices in bits per parameter (scales included)."""
        sizes = {name: self._w0[name].numel() for name in self.assignment}
        return sum(self.assignment[n].bits_per_param * k for n, k in sizes.items()) / max(1, sum(sizes.values()))

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = Q + s·B·A − W0 in float64: the quantisation error plus the trained low-rank part."""
        return {name: (self._q[name] + s_ba - self._w0[name].double()).float()
                for name, s_ba in self.products(model).items()}

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        """For the record: the storage of Q (average bits per parameter) and the mean initial relative residual
        ‖W0 − Q − L1·L2‖_F / ‖W0‖_F over the adapted matrices."""
        return {"lq_average_bits": self.average_bits,
                "lq_init_relative_residual": float(np.mean(list(self.init_residual.values())))}

