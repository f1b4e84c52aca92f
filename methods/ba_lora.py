"""BA-LoRA: PiSSA plus consistency, diversity and SVD regularisers on the outputs, against the model at init."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, WrapContext
from methods.lora import LoRA

TaskType = Literal["auto", "nlu", "nlg"]
EPS = 1e-10  # the reference's guard in the singular-value share


def top_k_share(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_{i≤k} σ_i / (Σ_i σ_i + 1e-10) of a matrix (..., p, q), batched over leading dimensions (fp32)."""
    with torch.autocast(matrix.device.type, enabled=False):
        sigma = torch.linalg.svdvals(matrix.float())  # (..., min(p, q)) descending
    return sigma[..., :k].sum(-1) / (sigma.sum(-1) + EPS)


def nlu_terms(logits: torch.Tensor, reference: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The three NLU regularisers of a batch of logits Z (B, C) against the reference model's Z_ref (B, C):

    consistency = mean_{b,c} (Ẑ − Ẑ_ref)², Ẑ = Z / ‖Z‖_row;
    diversity   = (1/C) Σ_{i≠j} Cov(Z)_ij², Cov = (Z − Z̄)ᵀ(Z − Z̄) / (B − 1)  (0 for a batch of one);
    svd         = −Σ_{i≤k} σ_i(Z) / Σ σ_i(Z).
    """
    z = logits.float()  # (B, C)
    consistency = F.mse_loss(F.normalize(z, dim=-1), F.normalize(reference.float(), dim=-1))
    batch, classes = z.shape
    if batch > 1:
        centred = z - z.mean(dim=0)  # (B, C)
        cov = centred.T @ centred / (batch - 1)  # (C, C)
        diversity = (cov - torch.diag(torch.diag(cov))).pow(2).sum() / classes
    else:
        diversity = z.new_zeros(())
    return {"consistency": consistency, "diversity": diversity, "svd": -top_k_share(z, k)}


def nlg_terms(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None,
              k: int) -> dict[str, torch.Tensor]:
    """The three NLG regularisers of token logits Z (B, T, V) against the reference model's, over the tokens with
    mask = 1 (B, T):

    consistency = Σ_{b,t} KL(p_ref ‖ p)_{bt} / B   (KL summed over tokens, averaged over sequences: 'batchmean');
    diversity   = −mean_{b,t} H(p_{bt}),  H(p) = −Σ_v p_v log p_v;
    svd         = −mean_b Σ_{i≤k} σ_i(Z_b) / Σ σ_i(Z_b), Z_b (T, V) the sequence's logits with masked rows zeroed.
    """
    z, ref = logits.float(), reference.float()  # (B, T, V)
    m = torch.ones(z.shape[:2], device=z.device) if mask is None else mask.to(z.device, torch.float32)  # (B, T)
    log_p, log_ref = F.log_softmax(z, dim=-1), F.log_softmax(ref, dim=-1)  # (B, T, V)
    kl = (log_ref.exp() * (log_ref - log_p)).sum(-1)  # (B, T)
    entropy = -(log_p.exp() * log_p).sum(-1)  # (B, T)
    share = top_k_share(z * m[..., None], k)  # (B,)
    return {"consistency": (kl * m).sum() / z.shape[0],
            "diversity": -(entropy * m).sum() / m.sum().clamp_min(1.0),
            "svd": -share.mean()}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout), each restored to its own previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class BALoRA(LoRA):
    """BA-LoRA: PiSSA (y = W_res·x + s·B·A·x, B0·A0 the top-r SVD of W0) trained on
    L = L_task + λ1·L_consistency + λ2·L_diversity + λ3·L_svd, the regularisers taken on the model's outputs:

    - NLU (logits Z, B×C): λ1·MSE(Z/‖Z‖, Z_ref/‖Z_ref‖) + λ2·(1/C)·Σ_{i≠j} Cov(Z)_ij² − λ3·Σ_{i≤k}σ_i(Z)/Σσ_i(Z);
    - NLG (token logits): λ1·KL(p_ref ‖ p) − λ2·H(p) − λ3·(top-k singular-value share of each sequence's logits).

    Chang et al., "Bias-Aware Low-Rank Adaptation: Mitigating Catastrophic Inheritance of Large Language Models",
    arXiv 2408.04556; reference cyp-jlu-ai/BA-LoRA @ e119f2feb138bd8ae2114430ad2193ed9276fc4a (train.py,
    `CustomTrainer.compute_loss` and `svd_regularization`; scripts/ba-lora.sh: λ = (1e-4, 3e-4, 1e-4), lr 2e-5,
    PiSSA with α = r). The formulas of each term are in nlu_terms() and nlg_terms().

    The reference model is the model at init, i.e. the original weights: W_res + s·B0·A0 = W0 (up to the fp32
    rounding of PEFT's residual) with the task head at its initial value. It costs no second model: the trainable
    tensors at init (A0, B0, the head) are kept, and the reference logits come from the same model evaluated with
    them swapped in (torch.func.functional_call), under no_grad and in eval mode, as the reference repository runs
    its frozen copy. (Disabling the adapter would not do: PiSSA's frozen base is the residual W_res, not W0.) So the
    consistency term is exactly 0 at init in eval mode; in training mode the task forward has dropout and the
    reference forward has not, as in the reference repository.

    Where this differs from the reference:
    - The reference's `svd_regularization` indexes the singular values as a batch (`s[:, :k]`) after flattening the
      logits to one matrix, which fails for the 1-D spectrum of a matrix; this implements the evident intent: one
      matrix (B×C) for NLU, one per sequence (T×V) for NLG, with the reference's +1e-10 in the denominator.
    - NLG: padded positions (attention_mask = 0) are left out of the three terms (the reference counts them), and
      the KL uses log-softmax on both sides (the reference takes log of softmax, which can give −inf).
    - The reference model is not a second copy loaded from the checkpoint (the reference repository's, for causal
      LMs only): for a classifier such a copy would get its own random head; here it shares the head at init.
    - Task type: `auto` picks NLU for 2-D logits (sequence classification) and NLG for 3-D ones (causal LM); the
      reference takes a flag.

    On GLUE (C ≤ 3 ≤ k), the top-k share of a B×C matrix is 1 − O(1e-10): the SVD term is a constant (−λ3) with
    no gradient, and for regression (STS-B, C = 1) all three terms are constant (a 1-D normalised logit is its
    sign, a 1×1 covariance has no off-diagonal). This is the method as specified, not a bug of this implementation.

    Args:
        lr: learning rate.
        target_modules: module-name suffixes to adapt (PEFT's matching rule).
        r: rank of B·A (PiSSA's top-r singular directions of W0).
        alpha: scaling numerator, s = alpha / r (the reference: alpha = r).
        dropout: dropout on the adapter's input (the reference: 0).
        lambda1: weight of the consistency term.
        lambda2: weight of the diversity term.
        lambda3: weight of the SVD term.
        k: singular values in the top-k share.
        task_type: nlu, nlg, or auto (from the logits' shape).
    """

    unsupported_heads = {"diffusion": "BA-LoRA regularises a model's output logits"}

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        lambda1: float = 1e-4,
        lambda2: float = 3e-4,
        lambda3: float = 1e-4,
        k: int = 3,
        task_type: TaskType = "auto",
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, init="pissa")
        if min(lambda1, lambda2, lambda3) < 0:
            raise ValueError(f"BA-LoRA lambdas must be >= 0, got {(lambda1, lambda2, lambda3)}")
        if k < 1:
            raise ValueError(f"BA-LoRA k must be >= 1, got {k}")
        if task_type not in ("auto", "nlu", "nlg"):
            raise ValueError(f"BA-LoRA task_type must be auto, nlu or nlg; got {task_type!r}")
        self.lambdas = (float(lambda1), float(lambda2), float(lambda3))
        self.k, self.task_type = int(k), task_type
        self._initial: dict[str, torch.Tensor] = {}
        self.last_terms: dict[str, torch.Tensor] = {}  # the latest unweighted terms, detached (for logs and tests)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        peft_model = super().wrap(model, ctx)
        # the trainable tensors at init (A0, B0, head): with them, the model computes the original function
        self._initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return peft_model

    def reference_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The logits of the model at init on `batch`: eval mode, no gradient, the current weights untouched."""
        device = next(model.parameters()).device
        if any(t.device != device for t in self._initial.values()):  # wrap() ran before the model moved
            self._initial = {n: t.to(device) for n, t in self._initial.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), _eval_mode(model):
            return torch.func.functional_call(model, self._initial, args=(), kwargs=inputs).logits

    def terms(self, model: nn.Module, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted regularisers (consistency, diversity, svd) of `logits` on `batch`."""
        reference = self.reference_logits(model, batch)
        kind = self.task_type if self.task_type != "auto" else ("nlu" if logits.dim() == 2 else "nlg")
        if kind == "nlu":
            if logits.dim() != 2:
                raise ValueError(f"BA-LoRA task_type=nlu expects (B, C) logits, got shape {tuple(logits.shape)}")
            return nlu_terms(logits, reference, self.k)
        if logits.dim() != 3:
            raise ValueError(f"BA-LoRA task_type=nlg expects (B, T, V) logits, got shape {tuple(logits.shape)}")
        return nlg_terms(logits, reference, batch.get("attention_mask"), self.k)

    def extra_loss(self, model: nn.Module, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if getattr(outputs, "logits", None) is None:
            raise TypeError(f"{self.unsupported_heads['diffusion']}; {type(outputs).__name__} has none (a "
                            "denoising loss, e.g. task=dreambooth). Use it on classification or language-model tasks.")
        terms = self.terms(model, batch, outputs.logits)
        self.last_terms = {n: t.detach() for n, t in terms.items()}
        l1, l2, l3 = self.lambdas
        return l1 * terms["consistency"] + l2 * terms["diversity"] + l3 * terms["svd"]
