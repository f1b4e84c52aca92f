"""Sharpness at init: the largest eigenvalue λ_max of the loss Hessian in the trainable parameters.

The tuning protocol records it once per study ("sharpness as a guide", bench/run.py:measure_sharpness) after
Lee, Ko, Chen & Yeh, "Learning Rate Matters: Vanilla LoRA May Suffice for LLM Fine-tuning", arXiv:2602.04998.
What that paper and its code (github.com/yuang-lee/lr-matters-lora, run-hessian/lanczos.py) do:

* λ_max of the Hessian of the training loss at initialisation, in the LoRA parameters only, per module: one
  estimate per (layer, projection) for the pair {lora_A, lora_B} of that module, not one over all adapters jointly.
* Lanczos with full re-orthogonalisation on Hessian-vector products (torch.autograd.functional.vhp), the HVP
  averaged over 100 batches of 5 samples weighted by their valid-token counts; stop when λ_max moves less than an
  absolute tol (5e-3 in their README) or after max_iter; model in eval mode, dropout disabled, fp32 weights
  ("Lanczos is numerically unstable in finite precision"), and flash / memory-efficient SDPA turned off because
  those kernels have no double backward (they force the math backend).
* The relation to the learning rate is empirical and qualitative only: the optimal learning rate is "generally
  negatively correlated" with λ_max, "aligning with classical learning theories" (the η < 2/λ_max stability bound of
  gradient descent). Their ratios are not a fixed law: on Qwen3-0.6B, OLoRA / LoRA-GA have up to 100x LoRA's λ_max
  and an 18.2x lower best LR, PiSSA ~10x and ~10x, Init[AB] / MiLoRA ~2x and 1.8x / 3.2x; the models are trained
  with AdamW, for which the GD bound does not transfer directly. Hence no `lr_guess` here: use λ_max to compare
  methods and to centre or narrow a learning-rate search, not as a formula.

This module uses the standard estimator instead of Lanczos: power iteration on exact Hessian-vector products (double
backward), as in PyHessian (Yao et al., arXiv:1912.07145). It differs from the paper in three documented ways:
(1) one estimate over all of `params` jointly (pass a subset, e.g. one module's lora_A/lora_B, to get the
paper's per-module numbers); (2) the loss is the plain mean over `batches` of `loss_fn` (each batch equally weighted,
not token-weighted); (3) power iteration converges to the eigenvalue of largest *magnitude* (Lanczos gives the
top and bottom of the spectrum): if the most negative eigenvalue is larger in magnitude than the most positive one,
the returned `lambda_max` is that negative value (the signed Rayleigh quotient); if the two are nearly equal in
magnitude the iteration oscillates and `converged` stays False. This matters for LoRA at init: with B = 0 the
Hessian in (A, B) is [[0, C], [Cᵀ, D]] (no A-A curvature, a cross block C from the gradient, a B-B block D), so its
spectrum comes in near ± pairs unless D dominates (the paper's own example: max 0.381, min -0.288); on a tiny random
BERT with initializer_range 0.02 and lora_alpha = 2r the negative side wins and the estimate does not converge.
Read a negative or unconverged record as "no dominant positive curvature", not as λ_max.

Attention kernels: `transformers` BERT defaults to attn_implementation="sdpa"; on CPU (torch 2.13) the fused kernel
`_scaled_dot_product_flash_attention_for_cpu` has no derivative of its backward, so double backward fails with
"derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" (CUDA's flash and
memory-efficient kernels likewise). The estimate therefore runs under `sdpa_kernel(SDPBackend.MATH)`, which makes
SDPA models work unchanged. Kernels that this cannot reach (attn_implementation="flash_attention_2", custom ops)
make the function raise a RuntimeError that says to load the model with attn_implementation="eager".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# Substrings of the autograd errors that mean "this op has no double backward".
_NO_DOUBLE_BACKWARD = ("derivative for", "not implemented", "differentiate twice", "double backward",
                       "once_differentiable")


@dataclass
class Sharpness:
    """The estimate. `eigenvector` (name -> fp32 tensor, unit norm over all params jointly) is the v whose Rayleigh
    quotient v·Hv is `lambda_max`; it is kept for checks and left out of the record."""

    lambda_max: float
    iters: int
    converged: bool
    batches: int
    seconds: float
    eigenvector: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def as_record(self) -> dict[str, Any]:
        return {"lambda_max": self.lambda_max, "iters": self.iters, "converged": self.converged,
                "batches": self.batches, "seconds": round(self.seconds, 3), "method": "power_iteration_hvp"}


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


@contextlib.contextmanager
def _fp32_math_attention(devices: set[torch.device], model: nn.Module) -> Iterator[None]:
    """Grad on, autocast off (fp32 compute) on the params' device types, SDPA on its math kernel, model in eval mode
    and the global RNG state forked; all restored on exit."""
    modes = {m: m.training for m in model.modules()}
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.enable_grad())
        for kind in sorted({d.type for d in devices} | {"cpu"}):
            with contextlib.suppress(RuntimeError, ValueError):  # a device type without autocast support
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        model.eval()
        try:
            yield
        finally:
            for m, training in modes.items():
                m.training = training


def top_hessian_eigenvalue(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    iters: int = 20, tol: float = 1e-3, seed: int = 0,
) -> Sharpness:
    """λ_max of the Hessian of mean(loss_fn(model, b) for b in batches) w.r.t. `params` only, by power iteration.

    v starts as a standard normal vector from a private torch.Generator(seed) (the global RNG is never advanced: its
    state is also forked around every forward, so a loss_fn that draws random numbers leaves it unchanged either),
    normalised over all params jointly. Each iteration averages H_b v over the batches (double backward, one batch
    graph at a time), takes the Rayleigh quotient λ = v·Hv and sets v = Hv/‖Hv‖; it stops when
    |λ - λ_prev| < tol·|λ| or after `iters` iterations. Params that do not influence the loss get zero curvature.
    The model runs in eval mode (no dropout) and fp32 (autocast off) and its train/eval flags are restored per
    module; `.grad` of every model parameter is left as it was (torch.autograd.grad never writes it; it is also
    restored defensively). The returned value is the signed Rayleigh quotient of the eigenvalue of largest magnitude
    (see the module docstring for the negative case).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not batches:
        raise ValueError("top_hessian_eigenvalue needs at least one batch")
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for name, p in params.items():
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad")
        if id(p) not in seen:  # a tied parameter under two names is one set of coordinates
            seen.add(id(p))
            names.append(name)
            tensors.append(p)
    if not tensors:
        raise ValueError("top_hessian_eigenvalue needs at least one parameter")
    low = sorted({str(p.dtype) for p in tensors if p.dtype != torch.float32})
    if low:
        log.warning("sharpness: parameters in %s; the estimate is only reliable with fp32 weights", ", ".join(low))

    start = time.perf_counter()
    saved_grads = {id(p): (p, p.grad) for p in [*model.parameters(), *tensors]}
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device) for p in tensors]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]

    def hvp(vec: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(x) for x in vec]
        for batch in batches:
            loss = loss_fn(model, batch)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            try:
                grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
                gv = sum(((g * x.to(g.dtype)).sum() for g, x in zip(grads, vec) if g is not None),
                         torch.zeros((), device=loss.device))
                hv = (torch.autograd.grad(gv, tensors, allow_unused=True) if gv.requires_grad
                      else (None,) * len(tensors))  # loss at most linear in params: zero curvature
            except RuntimeError as e:
                if any(s in str(e) for s in _NO_DOUBLE_BACKWARD):
                    raise RuntimeError(
                        "top_hessian_eigenvalue: an op in the model's forward has no double backward (needed for "
                        "Hessian-vector products); SDPA already runs on its math kernel here, so this is another "
                        "kernel: load the model with attn_implementation=\"eager\" (e.g. "
                        "AutoModel.from_pretrained(..., attn_implementation=\"eager\")) or replace the op. "
                        f"Original error: {e}") from e
                raise
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach().float(), alpha=1.0 / len(batches))
            del loss, grads, gv, hv  # free this batch's double-backward graph before the next one
        return out

    lam, prev, converged, done = 0.0, None, False, 0
    try:
        with _fp32_math_attention({p.device for p in tensors}, model):
            for done in range(1, iters + 1):
                hv = hvp(v)
                lam = _dot(v, hv)
                hv_norm = math.sqrt(_dot(hv, hv))
                if not math.isfinite(lam) or not math.isfinite(hv_norm):
                    raise FloatingPointError(f"non-finite Hessian-vector product at iteration {done}")
                if hv_norm == 0.0:  # v in the null space (e.g. no param reaches the loss): no curvature seen
                    converged = True
                    break
                if prev is not None and abs(lam - prev) < tol * max(abs(lam), 1e-30):
                    converged = True
                    break
                prev = lam
                if done < iters:
                    v = [h / hv_norm for h in hv]
    finally:
        for p, grad in saved_grads.values():
            if p.grad is not grad:
                p.grad = grad
    eigenvector = {n: x.detach().clone() for n, x in zip(names, v)}
    return Sharpness(lambda_max=float(lam), iters=done, converged=converged, batches=len(batches),
                     seconds=time.perf_counter() - start, eigenvector=eigenvector)
