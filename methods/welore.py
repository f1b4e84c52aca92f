"""WeLore: non-uniform low-rank compression from each matrix's singular-value spectrum, then fine-tuning of the
matrices that compress well (the low-rank components)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import WrapContext
from methods.compress import CompressedLinear, CompressedLoRA, batch_source, batch_stream, score
from methods.lora import LoraInit


@dataclass
class WeLoreSplit:
    """One matrix's WeLore decision: `pruned` of `rank` singular values fall below τ after min-max normalisation;
    a low-rank component (LRC) when pruned/rank > min_ratio, with W ≈ up·down, up = U_k√S_k, down = √S_kV_kᵀ."""

    rank: int
    pruned: int
    up: torch.Tensor | None  # (m, k) for an LRC
    down: torch.Tensor | None  # (k, n) for an LRC

    @property
    def is_lrc(self) -> bool:
        return self.up is not None


def welore_split(w: torch.Tensor, tau: float, min_ratio: float) -> WeLoreSplit:
    """σ̂ = (σ − σ_min)/(σ_max − σ_min); the σ̂ < τ are pruned (the tail, σ being sorted); k = rank − pruned.

    A flat spectrum (σ_max = σ_min) prunes nothing (the reference's 0/0 compares False)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (m, q), (q,), (q, n) descending
    rank = s.numel()
    spread = s.max() - s.min()
    pruned = int(((s - s.min()) / spread < tau).sum()) if spread > 0 else 0
    if pruned / rank <= min_ratio:
        return WeLoreSplit(rank, pruned, None, None)
    k = rank - pruned
    root = s[:k].sqrt()  # (k,)
    return WeLoreSplit(rank, pruned, u[:, :k] * root, root[:, None] * vh[:k])  # (m, k), (k, n)


class WeLore(CompressedLoRA):
    """WeLore after LoRA fine-tuning: W = U_k√S_k·√S_kV_kᵀ (trainable) where the spectrum is heavy-tailed, W frozen
    elsewhere; then a short fine-tuning of the low-rank components.

    Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients",
    arXiv 2407.11239; reference VITA-Group/WeLore @ 3f3dac6d3535b40a444cb0f12f4b7353bb5a6059 (utils.py
    `adaptive_rank_pruning`, lib/rank_reduction.py `do_rank_reduction`, lib/LowRankLayer.py,
    welore_continual_finetune.py).

    Training is LoRA's (PEFT; every key of conf/method/lora.yaml). post_train(), in this harness:
    1. W = W0 + ΔW_LoRA for every target layer: the fine-tuned model ("base/<metric>", scored with ctx.evaluate).
    2. Compression (`welore_split`): min-max normalise W's singular values, prune those below τ (`tau`); a matrix
       whose rank reduction pruned/rank exceeds `min_ratio` becomes a low-rank component (LRC) B·A with
       B = U_k√S_k (m×k), A = √S_kV_kᵀ (k×n), k = rank − pruned; the others (N-LRCs) keep W whole and frozen.
       Scored as "compressed/<metric>". The target layers then store Σ_LRC k(m+n) + Σ_N-LRC m·n weights
       ("welore/params_after"; "welore/params_before" = Σ m·n).
    3. Compensation: `compensation_steps` AdamW steps (at most train.max_steps; lr `compensation_lr`, no weight decay,
       constant lr, fp32, no clipping) on the LRC factors alone, everything else (N-LRCs, heads, biases) frozen,
       over ctx.train_batches() with the task loss ctx.loss_fn, pass after pass. The runner's final evaluation
       scores this model.
    Afterwards the LRC factors (and the task heads trained with the LoRA) are the trainable set; merge() writes B·A
    into a plain Linear, delta_weights() = B·A − W0 (LRC) or W − W0 (N-LRC). The record's params.trainable counts
    the LoRA that training updated (the runner counts before post_train); "welore/lrc_params" counts the LRCs.

    Where this differs from the reference: the reference compresses the pre-trained LLaMA (τ picked per model from
    a table to hit a target rank reduction: LLaMA-2-7B 50% → τ = 0.175) and then fine-tunes the LRCs as the whole
    adaptation (continual pre-training, or downstream for 1000s of steps); here the matrices compressed are the
    LoRA-fine-tuned ones of the adapted layers only (the target modules, the classification head left whole), and the
    compensation is a short fine-tuning after the LoRA run. The LRC keeps the layer's bias (frozen; LLaMA has none).

    Args (beyond LoRA's):
        tau: τ, the pruning threshold on min-max-normalised singular values (the reference: 0.175 for 50% on
            LLaMA-2-7B).
        min_ratio: a matrix becomes an LRC when its rank reduction exceeds this (the reference: 0.4999).
        compensation_steps: AdamW steps of the LRC fine-tuning after compression (0: none), at most train.max_steps.
        compensation_lr: their learning rate.
    """

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: LoraInit = "default",
        use_dora: bool = False,
        use_rslora: bool = False,
        tau: float = 0.175,
        min_ratio: float = 0.4999,
        compensation_steps: int = 100,
        compensation_lr: float = 1e-4,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, init=init,
                         use_dora=use_dora, use_rslora=use_rslora)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"method.tau must be in [0, 1] (a threshold on normalised singular values), got {tau}")
        if not 0.0 <= min_ratio < 1.0:
            raise ValueError(f"method.min_ratio must be in [0, 1), got {min_ratio}")
        if compensation_steps < 0 or not compensation_lr > 0:
            raise ValueError(f"need method.compensation_steps >= 0 and method.compensation_lr > 0, "
                             f"got {compensation_steps}, {compensation_lr}")
        self.tau, self.min_ratio = float(tau), float(min_ratio)
        self.compensation_steps, self.compensation_lr = int(compensation_steps), float(compensation_lr)
        self.splits: dict[str, tuple[int, int, bool]] = {}  # layer: (rank, pruned, is LRC)

    def compress(self, model: nn.Module) -> list[CompressedLinear]:
        """Replace every target layer by its WeLore form; return the LRCs."""
        layers = self.lora_layers(model)
        weights = self.fine_tuned_weights(model)  # (m, n) float64 each
        lrcs = []
        for name, layer in layers.items():
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            split = welore_split(weights[name], self.tau, self.min_ratio)
            self.splits[name] = (split.rank, split.pruned, split.is_lrc)
            if split.is_lrc:
                up, down = split.up.to(dtype), split.down.to(dtype)  # type: ignore[union-attr]  # (m, k), (k, n)
                module = CompressedLinear(None, base.bias, up, down, trainable=True)
                lrcs.append(module)
            else:
                module = CompressedLinear(weights[name].to(dtype), base.bias, None, None, trainable=False)
            self.install(model, name, module)
        self.compressed = True
        return lrcs

    def compensate(self, model: nn.Module, lrcs: list[CompressedLinear], ctx: WrapContext) -> list[float]:
        """Fine-tune the LRC factors alone for compensation_steps AdamW steps; return the losses."""
        params = [p for m in lrcs for p in (m.A, m.B)]
        steps = min(self.compensation_steps, ctx.max_steps) if ctx.max_steps else self.compensation_steps
        if not params or steps == 0:
            return []
        if ctx.loss_fn is None:
            raise ValueError("WeLore's compensation needs ctx.loss_fn (set by bench/run.py); "
                             "or set method.compensation_steps=0")
        flags = {p: p.requires_grad for p in model.parameters()}
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.compensation_lr, weight_decay=0.0)
        stream = batch_stream(batch_source(ctx, self._calibration))
        was_training = model.training
        model.train()
        losses = []
        try:
            for step in range(steps):
                loss = ctx.loss_fn(model, next(stream))
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"WeLore compensation diverged at step {step} (loss {value}); "
                                             "lower method.compensation_lr")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)
        return losses

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        metric = ctx.main_metric or "score"
        base_score = score(ctx, model)
        lrcs = self.compress(model)
        compressed_score = score(ctx, model)
        losses = self.compensate(model, lrcs, ctx)

        modules = self.target_modules_now(model)
        before = sum(m.in_features * m.out_features for m in modules.values())  # type: ignore[operator]
        after = sum(m.stored_parameters() for m in modules.values())  # type: ignore[operator]
        total_rank = sum(rank for rank, _, _ in self.splits.values())
        out: dict[str, float] = {}
        if base_score is not None:
            out[f"base/{metric}"] = base_score
            out[f"compressed/{metric}"] = compressed_score  # type: ignore[assignment]
        out.update({
            "welore/lrc_layers": float(len(lrcs)),
            "welore/lrc_params": float(sum(m.stored_parameters() for m in lrcs)),  # what compensation trains
            "welore/layers": float(len(modules)),
            "welore/rank_reduction": sum(p for _, p, lrc in self.splits.values() if lrc) / total_rank,
            "welore/params_before": float(before),
            "welore/params_after": float(after),
            "welore/param_reduction": 1.0 - after / before,
            "welore/compensation_steps": float(len(losses)),
        })
        if losses:
            out["welore/compensation_loss_first"] = losses[0]
            out["welore/compensation_loss_last"] = losses[-1]
        return out
