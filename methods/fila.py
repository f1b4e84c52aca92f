"""FILA: LoRA initialised on the weights that matter to the forget set (Fisher-weighted low-rank approximation)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from methods.base import Batch, LossFn
from methods.lora import LoRA
from tasks.base import RETAIN_PREFIX, model_inputs


def squared_gradients(model: nn.Module, weights: dict[str, nn.Parameter],
                      batches: Iterable[Batch]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
    """Empirical Fisher diagonals of the NLL, F = Σ_b n_b·(∂NLL_b/∂W)² with n_b the labelled tokens of batch b,
    over the batches' rows (forget rows in an unlearning batch) and over their retain_ rows. Returns
    (F_rows, F_retain, tokens of rows, tokens of retain rows); F_retain is empty without retain rows. The model
    runs in eval mode (no dropout), so the estimate is a function of the weights and the batches alone."""
    rows = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    retain: dict[str, torch.Tensor] = {}
    counts = [0, 0]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # the Fisher of the model's function, not of dropout's noise
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for batch in batches:
            parts = [model_inputs(batch)]
            if any(k.startswith(RETAIN_PREFIX) for k in batch):
                parts.append({k[len(RETAIN_PREFIX):]: v for k, v in batch.items() if k.startswith(RETAIN_PREFIX)})
            for i, part in enumerate(parts):
                labels = part.get("labels")
                n = int((labels[:, 1:] != -100).sum()) if labels is not None and labels.ndim == 2 else len(
                    next(iter(part.values())))  # a causal LM's labelled tokens; else the rows
                grads = torch.autograd.grad(model(**part).loss, list(weights.values()))
                target = rows if i == 0 else retain
                for name, g in zip(weights, grads):
                    if name not in target:
                        target[name] = torch.zeros_like(g, dtype=torch.float32)
                    target[name] += n * g.float() ** 2
                counts[i] += n
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if counts[0] == 0:
        raise RuntimeError("FILA's Fisher estimate needs calibration batches; set train.calibration_batches > 0")
    return rows, retain, counts[0], counts[1]


class FILA(LoRA):
    """FILA: y = W_res·x + s·B·A·x with s·B0·A0 = D⁻¹·[D·W0]_r and W_res = W0 − s·B0·A0, D = diag(d).

    Cha et al., "Towards Robust and Cost-Efficient Knowledge Unlearning for Large Language Models" (ICLR 2025),
    arXiv 2408.06621; reference csm9493/efficient-llm-unlearning @ 272484aabc7ba970ed357dc9212fde4f4d62bb5a
    (TOFU/measure_importance.py, the Fisher; TOFU/forget.py, the initialisation).

    Calibration estimates the empirical Fisher F of the NLL on the forget rows and on the retain rows of the
    calibration batches (squared batch gradients, each batch weighted by its labelled tokens), the relative
    importance I = (F_forget/n_forget) / (ε + F_retain/n_retain) per weight entry, and the row weights
    d_i = √(Σ_j I_ij). With D·W0 = U S Vᵀ: A0 = (V_r √(S_r/s))ᵀ, B0 = diag(1/(d + ε))·U_r √(S_r/s), so s·B0·A0 is the
    row-weighted rank-r approximation of W0 (FWSVD's form) that the forget set relies on most and the retain set
    least; moving it out of W0 leaves the model where it was, and training then changes those directions first.

    Where it differs: the SVD is exact (the reference: torch.svd_lowrank, niter 2). On a task whose batches have
    no retain rows, I = F/n (the task's own Fisher, FWSVD's weighting).

    Args:
        epsilon: ε of the importance ratio and of 1/(d + ε) (the reference's 1e-5).
        (the rest as LoRA; the reference's α = 2r, the default here LoRA's α = r)
    """

    family = "adapter initialisation"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"), r: int = 8,
                 alpha: float = 8.0, dropout: float = 0.0, epsilon: float = 1e-5) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout)
        if not epsilon > 0:
            raise ValueError(f"FILA's epsilon must be > 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        layers = self.lora_layers(model)
        weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
        forget, retain, n_forget, n_retain = squared_gradients(model, weights, batches)
        importance = {name: forget[name] / n_forget / ((self.epsilon + retain[name] / n_retain) if retain else 1.0)
                      for name in weights}
        self.init_from_importance(model, importance)

    @torch.no_grad()
    def init_from_importance(self, model: nn.Module, importance: dict[str, torch.Tensor]) -> None:
        """Set A0, B0 from each layer's importance (m×n, like W0) and move s·B0·A0 out of the frozen weight."""
        for name, layer in self.lora_layers(model).items():
            base, s, r = layer.get_base_layer(), layer.scaling["default"], self.r
            w = base.weight.double()  # (m, n)
            d = importance[name].double().sum(1).sqrt()  # (m,)
            u, sv, vh = torch.linalg.svd(d[:, None] * w, full_matrices=False)  # (m, k), (k,), (k, n)
            root = (sv[:r] / s).sqrt()  # (r,)
            a = root[:, None] * vh[:r]  # (r, n)
            b = u[:, :r] * root / (d[:, None] + self.epsilon)  # (m, r)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            base.weight.copy_(w - s * (b @ a))
        self._init_product = self.products(model)  # s·B0·A0, subtracted by delta_weights()
