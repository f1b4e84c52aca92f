"""PELA: replace each weight by a low-rank factorisation of it, distil the compact model from the original, then
fine-tune the compact model parameter-efficiently."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, LossFn, WrapContext
from methods.compress import batch_source, batch_stream, score
from methods.structured_lora import DEFAULT_TARGETS, _generator, _kaiming_uniform
from methods.swap import AdaptedLinear, SwapMethod
from tasks.base import model_inputs

FINETUNE = ("lora", "full")


def compact_rank(m: int, n: int, ratio: float) -> int:
    """The rank k at which the factors U (m×k), V (k×n) hold 1/ratio of W's m·n entries: ⌊mn / (ratio·(m+n))⌋."""
    return max(1, int(m * n // (ratio * (m + n))))


class PELALinear(AdaptedLinear):
    """y = U·(V·x) + b + s·B·(A·x): the compact layer U (m×k), V (k×n), initialised from the truncated SVD of W0
    (U = U_k·√Σ_k, V = √Σ_k·V_kᵀ) and distilled, plus a LoRA (A r×n kaiming-uniform, B m×r zero) fine-tuned on it.

    W0 serves only as the teacher during distillation (`teacher` on: y = W0·x + b); afterwards it is dropped
    (drop_teacher), so the model holds k(m+n) entries per layer instead of mn.
    """

    def __init__(self, base: nn.Linear, k: int, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__(base)
        w = base.weight
        u, s, vh = torch.linalg.svd(w.detach().double().cpu(), full_matrices=False)  # (m, q), (q,), (q, n)
        root = s[:k].sqrt()
        self.k, self.scaling, self.teacher = int(k), float(alpha) / int(r), False
        self.up = nn.Parameter((u[:, :k] * root).to(w.device, w.dtype))  # (m, k)
        self.down = nn.Parameter((root[:, None] * vh[:k]).to(w.device, w.dtype))  # (k, n)
        self.lora_A = nn.Parameter(_kaiming_uniform((int(r), self.in_features), generator, w))  # (r, n)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, int(r), device=w.device, dtype=w.dtype))  # (m, r)

    def compact(self) -> torch.Tensor:
        return self.up @ self.down  # (m, n)

    def weight(self) -> torch.Tensor:
        return self.compact() + self.scaling * (self.lora_B @ self.lora_A)  # (m, n): W0 is not part of it

    def drop_teacher(self) -> None:
        self.base.weight = None  # the bias stays: it is part of the compact layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return self.base(x)  # (..., m) the original layer
        y = F.linear(F.linear(x, self.down), self.up, self.bias())  # (..., m)
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., m)


class PELA(SwapMethod):
    """PELA: W0 (m×n) → U·V with U (m×k), V (k×n) from its truncated SVD, k = ⌊mn / (c(m+n))⌋ (1/c of the entries);
    the compact model is distilled from the original by minimising
        L = α·mean_l ‖h_l(compact) − h_l(original)‖² + β·‖z(compact) − z(original)‖² + γ·mean_layers ‖U·V − W0‖²_∞
    (the output h_l of every block l = 1..L, logits z, and the weight perturbation regulariser with ε = `norm_eps`:
    (‖UV − W0‖_∞ − ε)², the entry-wise max norm), then fine-tuned: a LoRA on each compact layer (`finetune: lora`,
    the parameter-efficient fine-tuning the paper's models are meant for) or U, V themselves (`finetune: full`).

    Guo, Wang and Kankanhalli, "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation", CVPR 2024,
    arXiv 2310.10700; reference guoyang9/PELA @ 48b8e504abbd695e525aada7d1a697c7a25e26b7 (DeiT/low_rank.py
    `low_rank_approximate`, `ModuleLowRank`; DeiT/engine.py `inf_norm`, `train_one_epoch`; Swin/main.py defaults:
    compression_ratio 2, kd_alpha 1, kd_beta 0, inf_norm_weight 1, inf_norm_eps 0).

    As in the reference: the rank formula, the √Σ split of the SVD, the bias kept on the second factor, MSE feature
    distillation averaged over layers, the logit term (off by default), the max-norm regulariser averaged over the
    compressed layers; the student trains in train mode (dropout on), the teacher in eval mode.

    Where this differs from the reference (the paper leaves the downstream setting open):
    - Distillation runs in calibrate(), for `distill_steps` AdamW steps at `distill_lr` on the task's training
      inputs without their labels (the reference distils on the pre-training data with its own task loss added;
      here the task's labels are left to the fine-tuning that follows, so distillation adds no supervision).
    - Only U and V train during distillation; biases, norms and embeddings keep their pretrained values (the
      reference trains the whole student).
    - After distillation W0 is dropped from every compressed layer (the memory the paper saves); the record has the
      compact size, the score of the SVD-only model and of the distilled one (ctx.evaluate; for a task whose head
      starts untrained these are at chance), and the fine-tuned score as every run does.
    - Layers follow target_modules (the reference compresses every Linear with ≥ 10 outputs except named ones).

    Args:
        lr: learning rate of the fine-tuning (AdamW).
        target_modules: module-name suffixes of the layers to compress.
        compress_ratio: c, the compact layer holds 1/c of the layer's entries (the reference's compression_ratio).
        r: LoRA rank on each compact layer (`finetune: lora`).
        alpha: LoRA scaling numerator; s = alpha / r.
        finetune: lora (U, V frozen, a LoRA trained on them) or full (U and V trained).
        distill_steps: optimizer steps of the distillation (0: the SVD factors as they are).
        distill_lr: learning rate of the distillation (AdamW on U and V).
        feature_weight: α, the weight of the hidden-state MSE (kd_alpha).
        logit_weight: β, the weight of the logit MSE (kd_beta).
        norm_weight: γ, the weight of the max-norm regulariser (inf_norm_weight).
        norm_eps: ε, the max norm the regulariser aims at (inf_norm_eps).
    """

    family = "compression"
    init_equals_base = False  # the compact model approximates W0
    unsupported_heads = {"diffusion": "PELA distils the compact model on the block outputs (hidden states) of a "
                                      "transformer classifier or LM, which the DreamBooth UNet's forward does not return"}

    def __init__(self, lr: float, target_modules: Sequence[str] = DEFAULT_TARGETS, compress_ratio: float = 2.0,
                 r: int = 8, alpha: float = 8.0, finetune: str = "lora", distill_steps: int = 100,
                 distill_lr: float = 1e-4, feature_weight: float = 1.0, logit_weight: float = 0.0,
                 norm_weight: float = 1.0, norm_eps: float = 0.0) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if not compress_ratio > 1:
            raise ValueError(f"method.compress_ratio must be > 1 (1/c of the entries kept), got {compress_ratio}")
        if finetune not in FINETUNE:
            raise ValueError(f"method.finetune must be one of {FINETUNE}, got {finetune!r}")
        if r < 1 or distill_steps < 0:
            raise ValueError(f"need r >= 1 and distill_steps >= 0, got {r}, {distill_steps}")
        if min(feature_weight, logit_weight, norm_weight, norm_eps) < 0:
            raise ValueError("method.feature_weight, logit_weight, norm_weight and norm_eps must be >= 0")
        self.compress_ratio, self.r, self.alpha, self.finetune = float(compress_ratio), int(r), float(alpha), finetune
        self.distill_steps, self.distill_lr = int(distill_steps), float(distill_lr)
        self.feature_weight, self.logit_weight = float(feature_weight), float(logit_weight)
        self.norm_weight, self.norm_eps = float(norm_weight), float(norm_eps)
        self.ctx = WrapContext()
        self.stats: dict[str, float] = {}

    # ---------------------------------------------------------------------------------- setup
    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        k = compact_rank(base.out_features, base.in_features, self.compress_ratio)
        return PELALinear(base, k, self.r, self.alpha, _generator(ctx.seed, "pela", name))

    def layers(self, model: nn.Module) -> dict[str, PELALinear]:
        return self.adapted_layers(model)  # type: ignore[return-value]

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self.ctx = ctx
        model = super().wrap(model, ctx)
        self._train_fine_tuning(model)
        return model

    def _train_fine_tuning(self, model: nn.Module) -> None:
        for layer in self.layers(model).values():
            layer.up.requires_grad_(self.finetune == "full")
            layer.down.requires_grad_(self.finetune == "full")
            layer.lora_A.requires_grad_(self.finetune == "lora")
            layer.lora_B.requires_grad_(self.finetune == "lora")

    def layer_trainable(self, base: nn.Linear) -> int:
        m, n = base.out_features, base.in_features
        return (self.r if self.finetune == "lora" else compact_rank(m, n, self.compress_ratio)) * (m + n)

    # ---------------------------------------------------------------------------------- distillation
    def _forward(self, model: nn.Module, inputs: Batch, teacher: bool) -> Any:
        for layer in self.layers(model).values():
            layer.teacher = teacher
        try:
            return model(**inputs, output_hidden_states=True)
        finally:
            for layer in self.layers(model).values():
                layer.teacher = False

    def distillation_loss(self, model: nn.Module, inputs: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """L (see the class docstring) on one batch: the teacher's pass (eval mode, no grad), the student's pass."""
        mode = model.training
        model.eval()
        with torch.no_grad():
            t_out = self._forward(model, inputs, teacher=True)
        model.train(mode)
        s_out = self._forward(model, inputs, teacher=False)
        s_hidden, t_hidden = getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None)
        zero = next(iter(self.layers(model).values())).up.new_zeros(())
        blocks = list(zip(s_hidden[1:], t_hidden[1:])) if s_hidden else []  # [0] is the embeddings' output
        feature = sum(F.mse_loss(s.float(), t.float()) for s, t in blocks) / len(blocks) if blocks else zero
        logit = F.mse_loss(s_out.logits.float(), t_out.logits.float()) if self.logit_weight else zero
        norms = [(layer.compact() - layer.base.weight).abs().max().float() - self.norm_eps
                 for layer in self.layers(model).values()]
        norm = sum(n.pow(2) for n in norms) / len(norms)
        loss = self.feature_weight * feature + self.logit_weight * logit + self.norm_weight * norm
        parts = {"feature": feature, "logit": logit, "norm": norm, "loss": loss}
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        """Distil U and V from the original layers (distill_steps AdamW steps), then drop W0."""
        fallback = list(batches)
        self.stats = {}
        if self.distill_steps:
            if self.feature_weight == 0 and self.logit_weight == 0 and self.norm_weight == 0:
                raise ValueError("method.distill_steps > 0 with feature_weight, logit_weight and norm_weight all 0 "
                                 "has nothing to distil; set distill_steps=0 or a weight")
            if (s := score(self.ctx, model)) is not None:
                self.stats["pela_svd_score"] = s
            factors = [p for layer in self.layers(model).values() for p in (layer.up, layer.down)]
            for p in factors:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(factors, lr=self.distill_lr, weight_decay=0.0)
            was_training = model.training
            model.train()
            stream = batch_stream(batch_source(self.ctx, fallback))
            first = last = {}
            for step in range(self.distill_steps):
                inputs = {k: v for k, v in model_inputs(next(stream)).items() if k != "labels"}
                loss, parts = self.distillation_loss(model, inputs)
                if not math.isfinite(parts["loss"]):
                    raise FloatingPointError(f"PELA distillation loss is {parts['loss']} at step {step}; lower "
                                             "method.distill_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                first, last = (parts if step == 0 else first), parts
            model.train(was_training)
            self.stats.update({f"pela_distill_{k}_first": v for k, v in first.items()})
            self.stats.update({f"pela_distill_{k}_last": v for k, v in last.items()})
            self._train_fine_tuning(model)
        errors = [float((layer.compact().detach() - layer.base.weight).norm() / layer.base.weight.norm())
                  for layer in self.layers(model).values()]
        self.stats["pela_relative_error"] = sum(errors) / len(errors)  # mean ‖UV − W0‖_F / ‖W0‖_F
        for layer in self.layers(model).values():
            layer.drop_teacher()
        if self.distill_steps and (s := score(self.ctx, model)) is not None:
            self.stats["pela_distilled_score"] = s

    # ---------------------------------------------------------------------------------- state and record
    def saved_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable tensors and the distilled factors (they are not W0's, so an adapter needs them)."""
        saved = dict(self.trainable_parameters(model))
        for name, layer in self.layers(model).items():
            saved[f"{name}.up"], saved[f"{name}.down"] = layer.up, layer.down
        return saved

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        layers = list(self.layers(model).values())
        compact = sum(layer.k * (layer.in_features + layer.out_features) for layer in layers)
        original = sum(layer.in_features * layer.out_features for layer in layers)
        return {**self.stats, "pela_compact_params": float(compact), "pela_original_params": float(original),
                "pela_kept_fraction": compact / original}
